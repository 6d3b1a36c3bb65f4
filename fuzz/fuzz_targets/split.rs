//! Cutting a fuzz input into the chunks a socket or an HTTP body might deliver it in.

/// Splits `bytes` into consecutive, non-empty chunks whose sizes come from a small xorshift PRNG
/// seeded with `seed`: at most `1 + seed % 32` bytes each, so seed 0 cuts at every byte.
pub fn chunks(bytes: &[u8], seed: u8) -> Vec<&[u8]> {
    let max = 1 + u32::from(seed % 32);
    let mut state = u32::from(seed) | 0x5eed_0000;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (1 + state % max) as usize;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}
