//! Capture of a plugin's stdout and stderr: the last bytes are kept for error messages, older ones
//! are dropped, and writing never fails, so a chatty plugin is not broken by its own logging.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A shared buffer holding the last `capacity` bytes written to it.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    capacity: usize,
    tail: Arc<Mutex<VecDeque<u8>>>,
}

impl CapturedOutput {
    /// A capture keeping the last `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        CapturedOutput {
            capacity,
            tail: Arc::default(),
        }
    }

    /// The kept bytes, as (lossy) UTF-8.
    pub(crate) fn text(&self) -> String {
        let tail = self.tail.lock().unwrap();
        let (a, b) = tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }

    fn append(&self, bytes: &[u8]) {
        let mut tail = self.tail.lock().unwrap();
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (tail.len() + bytes.len()).saturating_sub(self.capacity);
        tail.drain(..overflow);
        tail.extend(bytes);
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes() {
        let out = CapturedOutput::new(8);
        out.append(b"hello ");
        out.append(b"world");
        assert_eq!(out.text(), "lo world");
        out.append(b"a much longer line");
        assert_eq!(out.text(), "ger line");
    }
}
