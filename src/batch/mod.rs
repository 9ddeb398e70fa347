//! The Batch API's data: files (metadata in the store, contents in a blob store), batches and
//! their lines, as OpenAI's objects. The lines run in `server::batch_runner`; validation of
//! a batch's input file is in [`input`].

pub mod input;
mod store;
pub mod webhooks;

use serde::Serialize;
use serde_json::Value;

pub use store::{BatchStore, Claimed, LineResult};

/// What a batch line may ask for.
pub const ENDPOINTS: &[&str] = &["/v1/images/generations"];

/// `file-…`, `batch_…`, `batch_req_…`: 24 random hex digits after the prefix.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// OpenAI's `FileObject`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
}

/// OpenAI's `Batch`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<Value>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// The blob name of a file's contents.
pub fn blob_name(file_id: &str) -> String {
    format!("{file_id}.jsonl")
}
