//! The file store: see `BlobStore`.
