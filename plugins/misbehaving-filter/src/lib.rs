//! Test fixture for the sandbox: a data filter that misbehaves as its params ask, on the first
//! batch it sees. `mode` is one of: "ok" (keeps everything), "loop" (never returns), "alloc"
//! (allocates without bound), "read-file" (reads `path`), "write-file"
//! (writes `path`), "connect" (opens a TCP socket to
//! `addr`), "env" (reads `var`), "clock" (reports the wall clock), "panic", "bad-json" (rewrites records to
//! invalid JSON), "stderr" (writes a line to stderr, then fails), "chatty" (writes ~5 MB to stderr, then keeps),
//! "sleep" (sleeps `ms` milliseconds, forever when 0, blocked in WASI rather than running code), "inflate"
//! (rewrites every record to one with a `text` of `size` bytes), "symlink" (creates a symbolic link `path`
//! pointing to `target`), "hardlink" (creates a hard link `path` to the file `target`), "wrong-type"
//! (rewrites records with their `text` set to a number).

use dusflow_sdk::data_filter::{DataFilter, Verdict};
use serde::Deserialize;
use serde_json::Value;
use std::io::{Read, Write};

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Params {
    mode: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    addr: String,
    #[serde(default)]
    var: String,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    size: usize,
    #[serde(default)]
    target: String,
}

struct Misbehave(Params);

impl DataFilter for Misbehave {
    type Params = Params;
    type Record = Value;

    fn new(params: Params) -> Result<Self, String> {
        Ok(Self(params))
    }

    fn filter(&mut self, record: Value) -> Result<Verdict, String> {
        let p = self.0.clone();
        match p.mode.as_str() {
            "ok" => Ok(Verdict::Keep),
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "read-file" => {
                let mut text = String::new();
                std::fs::File::open(&p.path)
                    .and_then(|mut f| f.read_to_string(&mut text))
                    .map_err(|e| format!("cannot read {}: {e}", p.path))?;
                Ok(Verdict::rewrite(&serde_json::json!({ "content": text })))
            }
            "write-file" => {
                std::fs::write(&p.path, "written by a plugin")
                    .map_err(|e| format!("cannot write {}: {e}", p.path))?;
                Ok(Verdict::Keep)
            }
            "connect" => {
                let mut s = std::net::TcpStream::connect(&p.addr)
                    .map_err(|e| format!("cannot connect to {}: {e}", p.addr))?;
                s.write_all(b"hello").map_err(|e| e.to_string())?;
                Ok(Verdict::Keep)
            }
            "env" => match std::env::var(&p.var) {
                Ok(v) => Ok(Verdict::rewrite(&serde_json::json!({ "value": v }))),
                Err(e) => Err(format!("cannot read ${}: {e}", p.var)),
            },
            "clock" => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?
                    .as_secs();
                Ok(Verdict::rewrite(&serde_json::json!({ "unix_secs": secs })))
            }
            "panic" => panic!("misbehaving-filter panics on purpose (record {record})"),
            "bad-json" => Ok(Verdict::Rewrite("{not json".into())),
            "chatty" => {
                for i in 0..100_000 {
                    eprintln!("misbehaving-filter: log line {i} of a chatty plugin");
                }
                Ok(Verdict::Keep)
            }
            "sleep" => {
                if p.ms == 0 {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(p.ms));
                Ok(Verdict::Keep)
            }
            "inflate" => Ok(Verdict::rewrite(
                &serde_json::json!({ "text": "x".repeat(p.size) }),
            )),
            "symlink" => {
                symlink(&p.target, &p.path)
                    .map_err(|e| format!("cannot create symlink {}: {e}", p.path))?;
                Ok(Verdict::Keep)
            }
            "hardlink" => {
                std::fs::hard_link(&p.target, &p.path)
                    .map_err(|e| format!("cannot create hard link {}: {e}", p.path))?;
                Ok(Verdict::Keep)
            }
            "wrong-type" => {
                let mut record = record;
                record["text"] = serde_json::json!(5);
                Ok(Verdict::rewrite(&record))
            }
            "stderr" => {
                eprintln!("misbehaving-filter: about to fail");
                Err("failed after writing to stderr".into())
            }
            other => Err(format!("unknown mode {other}")),
        }
    }
}

/// `symlink(2)` of wasi-libc (std's wrapper for WASI is unstable): resolves `link` through the preopened
/// directories like every other file operation.
fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    unsafe extern "C" {
        fn symlink(target: *const std::ffi::c_char, link: *const std::ffi::c_char) -> i32;
    }
    let target = std::ffi::CString::new(target)?;
    let link = std::ffi::CString::new(link)?;
    // SAFETY: two NUL-terminated strings that outlive the call.
    if unsafe { symlink(target.as_ptr(), link.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

dusflow_sdk::data_filter!(Misbehave);
