//! File messages on the actor: sending one, finding the file of a message, fetching it.

use kith_client::model::FileState;
use kith_protocol::chat::{Chat, ChatV1};
use kith_protocol::files::FileRef;

use super::*;

impl Actor {
    /// The group `q` names (for an upload, checked before its bytes are read).
    pub fn group_id(&self, q: &str) -> Result<GroupId, EngineError> {
        self.resolve(q)
    }

    /// Sends a file message whose content is in the file store already.
    pub fn send_file(&mut self, q: &str, file: FileRef) -> Result<MessageInfo, EngineError> {
        let id = self.resolve(q)?;
        file.check()
            .map_err(|e| EngineError::BadRequest(e.to_string()))?;
        let entry = self
            .send_chat(id, Chat::V1(ChatV1::File(Box::new(file))))?
            .ok_or_else(|| {
                EngineError::Internal("a file message without a history entry".into())
            })?;
        self.metrics.message_sent();
        self.check_self_updates = true;
        self.one_view(&id, &entry)
    }

    /// The file of message `m` of group `q`: its group and file message (with the key).
    pub fn file_of(&self, q: &str, m: &str) -> Result<(GroupId, FileRef), EngineError> {
        let id = self.resolve(q)?;
        let entry = self.find_message(&id, m)?;
        let EntryKind::File { file, .. } = entry.kind else {
            return Err(EngineError::BadRequest("that message has no file".into()));
        };
        if file.name.is_empty() || self.store.changes(&id, &entry.id, &entry.sender)?.deleted {
            return Err(EngineError::NotFound(
                "the file's message was deleted; the file is gone".into(),
            ));
        }
        Ok((id, *file))
    }

    /// Starts fetching the file of message `m` of group `q` (`kith download`).
    pub fn download_file(&self, q: &str, m: &str) -> Result<(FileRef, FileState), EngineError> {
        let (group, file) = self.file_of(q, m)?;
        let state = self.files.download(group, &file).map_err(files_error)?;
        Ok((file, state))
    }

    /// Sets (or with `None` clears) the size up to which files posted in group `q` are
    /// fetched as soon as their message arrives; returns the limit now in force.
    pub fn set_auto_download(&self, q: &str, limit: Option<u64>) -> Result<u64, EngineError> {
        let id = self.resolve(q)?;
        if let Some(l) = limit
            && l > kith_protocol::files::MAX_FILE_BYTES
        {
            return Err(EngineError::BadRequest(format!(
                "at most {} bytes",
                kith_protocol::files::MAX_FILE_BYTES
            )));
        }
        self.files
            .store()
            .set_auto_download(id, limit)
            .map_err(|e| files_error(e.into()))?;
        Ok(self.auto_download_limit(&id))
    }
}

/// A file service error as the engine reports it.
pub fn files_error(e: crate::files::FilesError) -> EngineError {
    use crate::files::{BlobError, FilesError};
    match e {
        FilesError::TooLarge { .. } | FilesError::Invalid(_) => {
            EngineError::BadRequest(e.to_string())
        }
        FilesError::NotComplete | FilesError::Store(BlobError::Incomplete(_)) => {
            EngineError::NotDownloaded(e.to_string())
        }
        FilesError::Store(BlobError::NotFound(_) | BlobError::Evicted(_)) => {
            EngineError::NotFound(e.to_string())
        }
        FilesError::Store(BlobError::Full { .. }) => EngineError::FileStoreFull(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}
