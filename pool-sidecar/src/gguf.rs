//! Reading what a GGUF model file says about its size before it is loaded: the architecture's
//! shape (layers, embedding width, attention heads, context length) from the header's metadata,
//! and the bytes of its tensors, from the tensor table. Only the header is read (a few MB at most,
//! however large the file), with every length checked against the file before anything is
//! allocated, so a corrupt or hostile file is a typed error, never a panic or a huge allocation.
//!
//! [`Footprint::estimate`] turns that into the memory an engine will need for it: the weights
//! (the tensor bytes, mapped or loaded whole) plus the KV cache for the context it is given (F16,
//! as llama.cpp keeps it by default). It leaves out the engine's compute buffers and runtime,
//! which depend on the engine and the device: the measured footprint of a loaded engine replaces
//! the estimate.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longer keys or strings than this are refused as corrupt (real ones are short; a tokenizer's
/// token strings are a few bytes each).
const MAX_STRING_BYTES: u64 = 1024 * 1024;
/// Bytes per element of the KV cache (F16).
const KV_ELEMENT_BYTES: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file")]
    NotGguf { path: String },
    #[error("{path}: GGUF version {version} is not supported (1 to 3 are)")]
    Version { path: String, version: u32 },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path} lacks {key}, needed to size its KV cache")]
    Missing { path: String, key: String },
}

/// What a GGUF file says about the memory its model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub architecture: String,
    pub block_count: u64,
    pub embedding_length: u64,
    pub head_count: u64,
    pub head_count_kv: u64,
    /// Per head; `embedding_length / head_count` when the file does not say.
    pub key_length: u64,
    pub value_length: u64,
    /// The context the model was trained for: what llama.cpp uses when given none.
    pub context_length: u64,
    /// Every tensor's data, in bytes, by its type and shape.
    pub tensor_bytes: u64,
}

/// The memory a model needs in an engine, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
}

impl Footprint {
    /// The weights plus the F16 KV cache for `context_tokens` (all slots together, as
    /// llama-server's `-c`; `None`: the model's training context).
    pub fn estimate(summary: &GgufSummary, context_tokens: Option<u64>) -> Footprint {
        let context = context_tokens
            .filter(|tokens| *tokens > 0)
            .unwrap_or(summary.context_length);
        let per_token = summary.head_count_kv.saturating_mul(
            summary
                .key_length
                .saturating_add(summary.value_length)
                .saturating_mul(KV_ELEMENT_BYTES),
        );
        Footprint {
            weights_bytes: summary.tensor_bytes,
            kv_cache_bytes: summary
                .block_count
                .saturating_mul(context)
                .saturating_mul(per_token),
        }
    }

    pub fn total(&self) -> u64 {
        self.weights_bytes.saturating_add(self.kv_cache_bytes)
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_summary(path: &Path) -> Result<GgufSummary, GgufError> {
    let shown = path.display().to_string();
    let io = |source| GgufError::Io {
        path: shown.clone(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut reader = Reader {
        inner: BufReader::new(file),
        len,
        path: shown.clone(),
    };
    reader.summary()
}

/// The GGUF metadata value types (`gguf_type`).
mod value_type {
    pub const UINT8: u32 = 0;
    pub const INT8: u32 = 1;
    pub const UINT16: u32 = 2;
    pub const INT16: u32 = 3;
    pub const UINT32: u32 = 4;
    pub const INT32: u32 = 5;
    pub const FLOAT32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const UINT64: u32 = 10;
    pub const INT64: u32 = 11;
    pub const FLOAT64: u32 = 12;
}

/// A metadata value kept for the summary: integers and strings; everything else is skipped.
enum Value {
    Integer(u64),
    Text(String),
    Other,
}

struct Reader {
    inner: BufReader<File>,
    len: u64,
    path: String,
}

impl Reader {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    fn position(&mut self) -> Result<u64, GgufError> {
        let path = self.path.clone();
        self.inner
            .stream_position()
            .map_err(|source| GgufError::Io { path, source })
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.corrupt("the header ends early"))?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// Skips `count` bytes, which must lie inside the file.
    fn skip(&mut self, count: u64) -> Result<(), GgufError> {
        let at = self.position()?;
        if at.checked_add(count).is_none_or(|end| end > self.len) {
            return Err(self.corrupt("a length runs past the end of the file"));
        }
        let offset = i64::try_from(count).map_err(|_| self.corrupt("a length is too large"))?;
        let path = self.path.clone();
        self.inner
            .seek_relative(offset)
            .map_err(|source| GgufError::Io { path, source })
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES || len > self.len {
            return Err(self.corrupt(format!("a string of {len} bytes")));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.corrupt("the header ends early"))?;
        String::from_utf8(buf).map_err(|_| self.corrupt("a string is not UTF-8"))
    }

    fn skip_string(&mut self) -> Result<(), GgufError> {
        let len = self.u64()?;
        self.skip(len)
    }

    /// Bytes of one value of a fixed-size type; `None` for strings and arrays.
    fn fixed_size(&self, kind: u32) -> Result<Option<u64>, GgufError> {
        use value_type::*;
        Ok(Some(match kind {
            UINT8 | INT8 | BOOL => 1,
            UINT16 | INT16 => 2,
            UINT32 | INT32 | FLOAT32 => 4,
            UINT64 | INT64 | FLOAT64 => 8,
            STRING | ARRAY => return Ok(None),
            other => return Err(self.corrupt(format!("unknown value type {other}"))),
        }))
    }

    fn value(&mut self, kind: u32) -> Result<Value, GgufError> {
        use value_type::*;
        Ok(match kind {
            UINT8 => Value::Integer(u64::from(self.bytes::<1>()?[0])),
            UINT16 => Value::Integer(u64::from(u16::from_le_bytes(self.bytes()?))),
            UINT32 => Value::Integer(u64::from(self.u32()?)),
            UINT64 => Value::Integer(self.u64()?),
            INT32 => {
                let value = i32::from_le_bytes(self.bytes()?);
                u64::try_from(value).map_or(Value::Other, Value::Integer)
            }
            INT64 => {
                let value = i64::from_le_bytes(self.bytes()?);
                u64::try_from(value).map_or(Value::Other, Value::Integer)
            }
            STRING => Value::Text(self.string()?),
            ARRAY => {
                let element = self.u32()?;
                let count = self.u64()?;
                match self.fixed_size(element)? {
                    Some(size) => {
                        let bytes = count
                            .checked_mul(size)
                            .ok_or_else(|| self.corrupt("an array is too large"))?;
                        self.skip(bytes)?;
                    }
                    None if element == STRING => {
                        if count > self.len {
                            return Err(self.corrupt("an array is longer than the file"));
                        }
                        for _ in 0..count {
                            self.skip_string()?;
                        }
                    }
                    None => return Err(self.corrupt("an array of arrays")),
                }
                Value::Other
            }
            other => {
                let size = self
                    .fixed_size(other)?
                    .ok_or_else(|| self.corrupt("unexpected value type"))?;
                self.skip(size)?;
                Value::Other
            }
        })
    }

    fn summary(&mut self) -> Result<GgufSummary, GgufError> {
        if &self.bytes::<4>().map_err(|_| self.not_gguf())? != MAGIC {
            return Err(self.not_gguf());
        }
        let version = self.u32()?;
        if !(1..=3).contains(&version) {
            return Err(GgufError::Version {
                path: self.path.clone(),
                version,
            });
        }
        let tensors = self.u64()?;
        let entries = self.u64()?;
        // Each entry and tensor takes at least 8 bytes: counts beyond the file are corrupt.
        if tensors > self.len / 8 || entries > self.len / 8 {
            return Err(self.corrupt("more entries than the file can hold"));
        }
        let mut integers = std::collections::HashMap::new();
        let mut architecture = None;
        for _ in 0..entries {
            let key = self.string()?;
            let kind = self.u32()?;
            match self.value(kind)? {
                Value::Integer(value) => {
                    integers.insert(key, value);
                }
                Value::Text(text) if key == "general.architecture" => architecture = Some(text),
                Value::Text(_) | Value::Other => {}
            }
        }
        let architecture = architecture.ok_or_else(|| self.missing("general.architecture"))?;
        let mut tensor_bytes: u64 = 0;
        for _ in 0..tensors {
            self.skip_string()?;
            let dims = self.u32()?;
            if dims > 8 {
                return Err(self.corrupt(format!("a tensor of {dims} dimensions")));
            }
            let mut elements: u64 = 1;
            for _ in 0..dims {
                elements = elements
                    .checked_mul(self.u64()?)
                    .ok_or_else(|| self.corrupt("a tensor is too large"))?;
            }
            let kind = self.u32()?;
            let _offset = self.u64()?;
            let bytes = tensor_data_bytes(kind, elements)
                .ok_or_else(|| self.corrupt(format!("unknown tensor type {kind}")))?;
            tensor_bytes = tensor_bytes
                .checked_add(bytes)
                .ok_or_else(|| self.corrupt("the tensors are too large"))?;
        }
        let key = |name: &str| format!("{architecture}.{name}");
        let required = |name: &str| {
            integers
                .get(&key(name))
                .copied()
                .ok_or_else(|| self.missing(&key(name)))
        };
        let block_count = required("block_count")?;
        let embedding_length = required("embedding_length")?;
        let head_count = required("attention.head_count")?.max(1);
        let context_length = required("context_length")?;
        let head_count_kv = integers
            .get(&key("attention.head_count_kv"))
            .copied()
            .unwrap_or(head_count);
        let per_head = embedding_length / head_count;
        Ok(GgufSummary {
            key_length: integers
                .get(&key("attention.key_length"))
                .copied()
                .unwrap_or(per_head),
            value_length: integers
                .get(&key("attention.value_length"))
                .copied()
                .unwrap_or(per_head),
            architecture,
            block_count,
            embedding_length,
            head_count,
            head_count_kv,
            context_length,
            tensor_bytes,
        })
    }

    fn not_gguf(&self) -> GgufError {
        GgufError::NotGguf {
            path: self.path.clone(),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::Missing {
            path: self.path.clone(),
            key: key.to_owned(),
        }
    }
}

/// The bytes of `elements` values of ggml type `kind` (`ggml_type`): block size and bytes per
/// block from ggml's type traits; `None` for a type this table does not know.
fn tensor_data_bytes(kind: u32, elements: u64) -> Option<u64> {
    let (block, bytes): (u64, u64) = match kind {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    };
    Some(elements.div_ceil(block).saturating_mul(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A GGUF v3 header written by hand: the keys of a LLaMA model and `tensors` F32 tensors of
    /// 4×4 (64 bytes each).
    struct Writer(Vec<u8>);

    impl Writer {
        fn new(entries: u64, tensors: u64) -> Writer {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend(3u32.to_le_bytes());
            bytes.extend(tensors.to_le_bytes());
            bytes.extend(entries.to_le_bytes());
            Writer(bytes)
        }

        fn string(&mut self, text: &str) {
            self.0.extend((text.len() as u64).to_le_bytes());
            self.0.extend(text.as_bytes());
        }

        fn u32_entry(&mut self, key: &str, value: u32) {
            self.string(key);
            self.0.extend(value_type::UINT32.to_le_bytes());
            self.0.extend(value.to_le_bytes());
        }

        fn string_entry(&mut self, key: &str, value: &str) {
            self.string(key);
            self.0.extend(value_type::STRING.to_le_bytes());
            self.string(value);
        }

        fn tokens_entry(&mut self, tokens: &[&str]) {
            self.string("tokenizer.ggml.tokens");
            self.0.extend(value_type::ARRAY.to_le_bytes());
            self.0.extend(value_type::STRING.to_le_bytes());
            self.0.extend((tokens.len() as u64).to_le_bytes());
            for token in tokens {
                self.string(token);
            }
        }

        fn tensor(&mut self, name: &str) {
            self.string(name);
            self.0.extend(2u32.to_le_bytes());
            self.0.extend(4u64.to_le_bytes());
            self.0.extend(4u64.to_le_bytes());
            self.0.extend(0u32.to_le_bytes());
            self.0.extend(0u64.to_le_bytes());
        }

        fn file(&self, dir: &Path) -> std::path::PathBuf {
            let path = dir.join("model.gguf");
            let mut file = File::create(&path).unwrap();
            file.write_all(&self.0).unwrap();
            // Room for the tensor data the header describes.
            file.write_all(&[0u8; 256]).unwrap();
            path
        }
    }

    fn llama(tensors: u64) -> Writer {
        let mut writer = Writer::new(8, tensors);
        writer.string_entry("general.architecture", "llama");
        writer.u32_entry("llama.block_count", 2);
        writer.u32_entry("llama.embedding_length", 64);
        writer.u32_entry("llama.attention.head_count", 4);
        writer.u32_entry("llama.attention.head_count_kv", 2);
        writer.u32_entry("llama.context_length", 256);
        writer.tokens_entry(&["<unk>", "<s>", "</s>"]);
        writer.string_entry("general.name", "tiny");
        for index in 0..tensors {
            writer.tensor(&format!("blk.{index}.weight"));
        }
        writer
    }

    #[test]
    fn a_header_gives_the_shape_and_the_tensor_bytes_and_the_kv_cache_follows_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let summary = read_summary(&llama(3).file(dir.path())).unwrap();
        assert_eq!(
            summary,
            GgufSummary {
                architecture: "llama".into(),
                block_count: 2,
                embedding_length: 64,
                head_count: 4,
                head_count_kv: 2,
                key_length: 16,
                value_length: 16,
                context_length: 256,
                tensor_bytes: 3 * 64,
            }
        );
        // 2 layers × tokens × 2 kv heads × (16 + 16) × 2 bytes.
        let trained = Footprint::estimate(&summary, None);
        assert_eq!(trained.kv_cache_bytes, 2 * 256 * 2 * 32 * 2);
        assert_eq!(trained.weights_bytes, 192);
        let given = Footprint::estimate(&summary, Some(1024));
        assert_eq!(given.kv_cache_bytes, 4 * trained.kv_cache_bytes);
        assert_eq!(given.total(), 192 + given.kv_cache_bytes);
    }

    #[test]
    fn corrupt_and_foreign_files_are_typed_errors_without_large_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let write = |bytes: &[u8]| {
            let path = dir.path().join("bad.gguf");
            std::fs::write(&path, bytes).unwrap();
            read_summary(&path)
        };
        assert!(matches!(
            write(b"PK\x03\x04zip"),
            Err(GgufError::NotGguf { .. })
        ));
        assert!(matches!(write(b"GG"), Err(GgufError::NotGguf { .. })));
        let mut future = b"GGUF".to_vec();
        future.extend(9u32.to_le_bytes());
        assert!(matches!(
            write(&future),
            Err(GgufError::Version { version: 9, .. })
        ));
        let whole = llama(1).0;
        for cut in [12, 30, whole.len() - 3] {
            assert!(
                matches!(write(&whole[..cut]), Err(GgufError::Corrupt { .. })),
                "cut at {cut}"
            );
        }
        let mut huge_string = Writer::new(1, 0);
        huge_string.0.extend(u64::MAX.to_le_bytes());
        assert!(matches!(
            write(&huge_string.0),
            Err(GgufError::Corrupt { .. })
        ));
        let mut huge_count = b"GGUF".to_vec();
        huge_count.extend(3u32.to_le_bytes());
        huge_count.extend(u64::MAX.to_le_bytes());
        huge_count.extend(u64::MAX.to_le_bytes());
        assert!(matches!(write(&huge_count), Err(GgufError::Corrupt { .. })));
        let mut no_shape = Writer::new(1, 0);
        no_shape.string_entry("general.architecture", "llama");
        assert!(matches!(
            read_summary(&no_shape.file(dir.path())),
            Err(GgufError::Missing { key, .. }) if key == "llama.block_count"
        ));
        assert!(matches!(
            read_summary(&dir.path().join("absent.gguf")),
            Err(GgufError::Io { .. })
        ));
    }
}
