//! pool-managerd's GGUF header reader against files the model generator writes
//! (`scripts/make-tiny-model.py`, the same generator the real-engine tests load into
//! llama-server): the shape it reports is the one the generator was asked for, and the tensor
//! bytes account for the file but its header.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::make_model;
use e2e::temp_dir;
use pool_sidecar::gguf::{Footprint, read_summary};

#[test]
fn the_reader_sees_the_shape_the_generator_wrote_and_tensor_bytes_fill_the_file() {
    let dir = temp_dir();
    for (layers, width, ctx) in [(2u64, 64u64, 256u64), (4, 128, 1024)] {
        let path = dir.path().join(format!("m-{layers}-{width}.gguf"));
        make_model(
            &path,
            &[
                "--layers",
                &layers.to_string(),
                "--width",
                &width.to_string(),
                "--ctx",
                &ctx.to_string(),
            ],
        );
        let summary = read_summary(&path).unwrap();
        assert_eq!(summary.architecture, "llama");
        assert_eq!(summary.block_count, layers);
        assert_eq!(summary.embedding_length, width);
        assert_eq!(summary.head_count, 4);
        assert_eq!(summary.context_length, ctx);
        assert_eq!(summary.key_length, width / 4);
        let file = std::fs::metadata(&path).unwrap().len();
        assert!(
            summary.tensor_bytes <= file && file - summary.tensor_bytes < 64 * 1024,
            "tensors {} of a {file}-byte file",
            summary.tensor_bytes
        );
        let footprint = Footprint::estimate(&summary, None);
        assert_eq!(
            footprint.kv_cache_bytes,
            layers * ctx * summary.head_count_kv * (width / 4) * 2 * 2
        );
    }
}

/// llama-server's own report of the KV cache it allocated for `model` with `args`, in MiB
/// (its `llama_kv_cache: size = … MiB` line, logged with `-v`); the server is killed (by pid) once
/// it has said so, or after 60 s.
fn llama_server_kv_cache_mib(model: &std::path::Path, args: &[&str]) -> f64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(e2e::real_engine::llama_server())
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", "0", "-v"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, report) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let size = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                let size = line.split("llama_kv_cache: size =").nth(1)?;
                size.split_whitespace().next()?.parse::<f64>().ok()
            });
        let _ = found.send(size);
    });
    let size = report.recv_timeout(std::time::Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    size.ok()
        .flatten()
        .expect("llama-server never reported its KV cache")
}

#[test]
fn the_kv_cache_estimate_is_what_llama_server_allocates() {
    let dir = temp_dir();
    let path = dir.path().join("kv.gguf");
    make_model(&path, &["--layers", "4", "--width", "128", "--ctx", "1024"]);
    let summary = read_summary(&path).unwrap();
    for (context, slots) in [(1024u64, "1"), (2048, "2")] {
        let estimate = Footprint::estimate(&summary, Some(context)).kv_cache_bytes;
        let reported =
            llama_server_kv_cache_mib(&path, &["-c", &context.to_string(), "-np", slots]);
        let estimated = estimate as f64 / (1024.0 * 1024.0);
        assert!(
            (reported - estimated).abs() < 0.01,
            "-c {context} -np {slots}: llama-server {reported} MiB, estimated {estimated} MiB"
        );
    }
}
