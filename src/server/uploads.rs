//! The bytes of uploads (edits, variations) held at once, bounded: an upload reserves what it
//! declares (or the largest upload, when it declares nothing) before it is read, and gives it
//! back when its request ends. One that would pass `server.max_upload_memory` gets a 503 with
//! `retry-after`, so a burst of large uploads cannot take the process's memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiError, ErrorKind};

#[derive(Default)]
pub struct UploadGate {
    held: Arc<AtomicUsize>,
}

/// Bytes reserved by one upload, given back on drop.
#[derive(Debug)]
pub struct UploadPermit {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl UploadGate {
    /// Reserves `bytes` if the total stays within `max`.
    pub fn reserve(&self, bytes: usize, max: usize) -> Result<UploadPermit, ApiError> {
        let mut now = self.held.load(Ordering::Acquire);
        loop {
            if now.saturating_add(bytes) > max {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    "The gateway is receiving as many uploads as it can hold; please retry shortly.",
                )
                .code("uploads_busy")
                .retry_after(Duration::from_secs(1)));
            }
            match self.held.compare_exchange_weak(
                now,
                now + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(UploadPermit {
                        held: self.held.clone(),
                        bytes,
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// Bytes reserved right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_past_the_limit_are_refused_until_one_ends() {
        let gate = UploadGate::default();
        let a = gate.reserve(600, 1000).unwrap();
        let refused = gate.reserve(500, 1000).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Unavailable);
        let b = gate.reserve(400, 1000).unwrap();
        assert_eq!(gate.held(), 1000);
        drop(a);
        assert_eq!(gate.held(), 400);
        gate.reserve(600, 1000).unwrap();
        drop(b);
        assert_eq!(gate.held(), 0, "every permit gave its bytes back");
    }
}
