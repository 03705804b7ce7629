//! Files on the node: the file store (encrypted chunks on disk, indexed in `files.redb`),
//! thumbnails and media types of what this node sends, and the fetching of files from the
//! members that hold them (see `kith_protocol::files` for the wire and the checks).

pub mod store;
pub mod thumb;
