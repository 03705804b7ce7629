//! File routes: sending a file (the request body is its bytes), fetching one, reading it,
//! its thumbnail, pinning, the store, and a group's automatic download setting.

use axum::body::Body;
use kith_client::model::{
    FileSettings, FileState, FileStoreInfo, PinBody, SendFileQuery, StoredFile,
};
use kith_protocol::files::{FileRef, safe_name};
use kith_protocol::ids::FileId;
use tokio::io::AsyncWriteExt;

use super::*;
use crate::engine::files_error;
use crate::files::{Files, thumb};

/// Bytes read from the start of a file to tell its media type.
const HEAD_BYTES: usize = 64;

/// Removes a spooled upload when the request ends, however it ends.
struct Spool(std::path::PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn payload_too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the file is larger than this node sends ({}; `[files] max_file_mib`)",
            kith_client::text::human_bytes(max)
        ),
    )
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    tracing::warn!(error = %e, "{what}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what}: {e}"),
    )
}

/// `POST /v1/groups/{group}/files?name=…[&caption=…]`: sends the body as a file.
pub(super) async fn send_file(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    query: Result<Query<SendFileQuery>, QueryRejection>,
    request: Request,
) -> Result<(StatusCode, Json<MessageInfo>), ApiError> {
    let Path(group) = group?;
    let Query(q) = query?;
    if q.name.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a file needs a name (`?name=`)",
        ));
    }
    let files = s.engine.files().clone();
    let max = files.policy().max_file_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(payload_too_large(max));
    }
    let gid = {
        let group = group.clone();
        s.engine.run(move |e| e.group_id(&group)).await?
    };
    let spool = Spool(files.spool_path());
    let mut out = tokio::fs::File::create(&spool.0)
        .await
        .map_err(|e| io_error("cannot spool the upload", e))?;
    let mut body = request.into_body().into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the upload was cut off: {e}"),
            )
        })?;
        received += chunk.len() as u64;
        if received > max {
            return Err(payload_too_large(max));
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| io_error("cannot spool the upload", e))?;
    }
    out.flush()
        .await
        .map_err(|e| io_error("cannot spool the upload", e))?;
    drop(out);
    let name = safe_name(&q.name);
    let caption = q.caption.unwrap_or_default();
    let imported = {
        let files = files.clone();
        let path = spool.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut head = vec![0u8; HEAD_BYTES];
            let n = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                .unwrap_or(0);
            head.truncate(n);
            let mime = thumb::media_type(&head, &name);
            let image = if mime.starts_with("image/") {
                thumb::picture(&path).unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "no thumbnail");
                    None
                })
            } else {
                None
            };
            let (id, key, layout) = files.import(&path, gid)?;
            Ok::<_, crate::files::FilesError>(FileRef {
                id,
                key,
                size: layout.size,
                chunk_bytes: layout.chunk_bytes,
                name,
                mime,
                image,
                caption,
            })
        })
        .await
        .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?
        .map_err(|e| ApiError::from(files_error(e)))?
    };
    drop(spool);
    let id = imported.id;
    match s.engine.run(move |e| e.send_file(&group, imported)).await {
        Ok(m) => Ok((StatusCode::CREATED, Json(m))),
        Err(e) => {
            // Not sent: its content has no message to belong to.
            let _ = tokio::task::spawn_blocking(move || files.forget(&[id])).await;
            Err(e.into())
        }
    }
}

/// `POST /v1/groups/{group}/messages/{id}/file/download`: starts fetching the file.
pub(super) async fn download(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(StatusCode, Json<FileState>), ApiError> {
    let Path((group, message)) = path?;
    let (_, state) = s
        .engine
        .run(move |e| e.download_file(&group, &message))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(state)))
}

/// `DELETE /v1/groups/{group}/messages/{id}/file/download`: stops fetching it.
pub(super) async fn cancel(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<FileState> {
    let Path((group, message)) = path?;
    let (_, file) = s.engine.run(move |e| e.file_of(&group, &message)).await?;
    let files = s.engine.files();
    files.cancel(&file.id);
    Ok(Json(files.state(&file.id)))
}

/// `PUT /v1/groups/{group}/messages/{id}/file/pin`.
pub(super) async fn pin(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<PinBody>, JsonRejection>,
) -> ApiResult<FileState> {
    let Path((group, message)) = path?;
    let Json(body) = body?;
    let (_, file) = s.engine.run(move |e| e.file_of(&group, &message)).await?;
    let files = s.engine.files().clone();
    let id = file.id;
    let state = tokio::task::spawn_blocking(move || {
        files.pin(&id, body.pinned)?;
        Ok::<_, crate::files::FilesError>(files.state(&id))
    })
    .await
    .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?
    .map_err(|e| ApiError::from(files_error(e)))?;
    Ok(Json(state))
}

/// The media type a file is served with: pictures as themselves, everything else as bytes
/// to save (never HTML or script on the API's origin).
fn served_type(file: &FileRef) -> HeaderValue {
    let mime = file.media_type();
    let inline = matches!(
        mime,
        "image/png" | "image/jpeg" | "image/gif" | "image/webp"
    );
    HeaderValue::from_str(if inline {
        mime
    } else {
        kith_protocol::files::OCTET_STREAM
    })
    .unwrap_or(HeaderValue::from_static(kith_protocol::files::OCTET_STREAM))
}

/// `Content-Disposition: attachment` with the safe name, ASCII fallback and UTF-8 form.
fn disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or(HeaderValue::from_static("attachment"))
}

/// `GET /v1/groups/{group}/messages/{id}/file`: the file's content, once held in full.
pub(super) async fn content(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((group, message)) = path?;
    let (_, file) = s.engine.run(move |e| e.file_of(&group, &message)).await?;
    let files = s.engine.files().clone();
    if files.state(&file.id).status != kith_client::model::FileStatus::Complete {
        return Err(EngineError::NotDownloaded(
            "the file is not downloaded yet (`kith download` fetches it)".into(),
        )
        .into());
    }
    let layout = file
        .layout()
        .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?;
    let headers = [
        (header::CONTENT_TYPE, served_type(&file)),
        (
            header::CONTENT_DISPOSITION,
            disposition(&file.display_name()),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox; default-src 'none'"),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from(layout.size)),
    ];
    let (id, key) = (file.id, file.key);
    let stream = futures::stream::unfold(0u32, move |i| {
        let files = files.clone();
        async move {
            if i >= layout.chunks() {
                return None;
            }
            let chunk = tokio::task::spawn_blocking(move || chunk_of(&files, id, &key, i)).await;
            let chunk = match chunk {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            Some((chunk, i + 1))
        }
    });
    Ok((headers, Body::from_stream(stream)).into_response())
}

fn chunk_of(files: &Files, id: FileId, key: &[u8; 32], i: u32) -> std::io::Result<Vec<u8>> {
    files.store().plain_chunk(id, key, i).map_err(|e| {
        tracing::warn!(file = %id.short(), chunk = i, error = %e, "cannot read a file being served to the API");
        std::io::Error::other(e.to_string())
    })
}

/// `GET /v1/groups/{group}/messages/{id}/file/thumbnail`: the picture's thumbnail, checked
/// with a bounded decoder first.
pub(super) async fn thumbnail(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((group, message)) = path?;
    let (_, file) = s.engine.run(move |e| e.file_of(&group, &message)).await?;
    let Some(t) = file.image.and_then(|i| i.thumb) else {
        return Err(EngineError::NotFound("that file has no thumbnail".into()).into());
    };
    let t = tokio::task::spawn_blocking(move || thumb::check_thumbnail(&t).map(|()| t))
        .await
        .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?
        .map_err(|e| {
            ApiError::from(EngineError::NotFound(format!(
                "the thumbnail is not a picture this node shows: {e}"
            )))
        })?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(t.format.mime()),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        t.bytes,
    )
        .into_response())
}

/// `PUT /v1/groups/{group}/files/settings`.
pub(super) async fn settings(
    State(s): State<ApiState>,
    group: Result<Path<String>, PathRejection>,
    body: Result<Json<FileSettings>, JsonRejection>,
) -> ApiResult<FileSettings> {
    let Path(group) = group?;
    let Json(body) = body?;
    let now = s
        .engine
        .run(move |e| e.set_auto_download(&group, body.auto_download_bytes))
        .await?;
    Ok(Json(FileSettings {
        auto_download_bytes: Some(now),
    }))
}

/// `GET /v1/files`: the file store.
pub(super) async fn store(State(s): State<ApiState>) -> ApiResult<FileStoreInfo> {
    let files = s.engine.files().clone();
    let info = tokio::task::spawn_blocking(move || {
        let usage = files.store().usage()?;
        let mut list = files.store().list()?;
        list.sort_by_key(|m| std::cmp::Reverse(m.added_ms));
        let files_out = list
            .iter()
            .map(|m| StoredFile {
                id: m.id.to_string(),
                groups: m.groups.iter().map(|g| g.to_string()).collect(),
                size: m.layout.size,
                own: m.own,
                state: files.state(&m.id),
            })
            .collect();
        Ok::<_, crate::files::BlobError>(FileStoreInfo {
            used_bytes: usage.bytes,
            quota_bytes: usage.quota,
            max_file_bytes: files.policy().max_file_bytes,
            files: files_out,
        })
    })
    .await
    .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?
    .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?;
    Ok(Json(info))
}
