//! Blob uploads: monolithic (`POST ?digest=`, or `POST` then one `PUT`)
//! and chunked (`POST`, `PATCH`…, `PUT ?digest=`).
//!
//! An upload is a file under the image store's `uploads/` directory and a
//! SHA-256 state in memory, fed as the bytes stream in: the digest is known
//! the moment the last byte arrives, with no second read. Only when it
//! matches the digest the client names is the file fsync'd and renamed
//! into the blob directory ([`ImageStore::commit_blob_file`]); until then
//! no one sees it, and a mismatch removes it. Sessions idle for longer
//! than [`IDLE`] are dropped; a controller restart drops them all (the
//! hash state is not kept), and clients start the upload again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::errors::{Code, RegistryError};
use crate::images::{digest_hex, ImageStore};

/// An upload untouched for this long is dropped.
pub const IDLE: Duration = Duration::from_secs(3600);
/// Most uploads open at once.
const MAX_SESSIONS: usize = 1024;
/// Write buffer of an upload file.
const WRITE_BUFFER: usize = 1 << 20;
/// Writeback of an upload is started every this many bytes, so the fsync
/// at the end has little left to write.
const WRITEBACK_EVERY: u64 = 16 << 20;

struct Session {
    repository: String,
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    hasher: Sha256,
    size: u64,
    /// Bytes whose writeback has been started.
    written_back: u64,
    touched: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A finished upload was renamed away; anything else is discarded.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A session is either idle in the map or taken by the one request
/// working on it (a second request at once is refused, not interleaved).
enum Slot {
    Idle(Box<Session>),
    Busy { repository: String, size: u64 },
}

/// The open uploads.
#[derive(Clone)]
pub struct Uploads {
    images: ImageStore,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

fn unknown(id: &str) -> RegistryError {
    RegistryError::new(
        Code::BlobUploadUnknown,
        format!("upload {id} is not known (finished, cancelled, idle too long, or from before a controller restart)"),
    )
}

fn io_failed(e: std::io::Error) -> RegistryError {
    tracing::error!(error = %e, "registry upload I/O failed");
    RegistryError::new(Code::Unavailable, format!("upload storage failed: {e}"))
}

/// A body ended early or could not be read: the bytes that arrived count.
fn body_failed(e: axum::Error) -> RegistryError {
    RegistryError::new(
        Code::BlobUploadInvalid,
        format!("request body could not be read: {e}"),
    )
}

impl Uploads {
    pub fn new(images: ImageStore) -> Uploads {
        Uploads {
            images,
            slots: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens an upload into `repository`; returns its id.
    pub async fn start(&self, repository: &str) -> Result<String, RegistryError> {
        {
            let mut slots = self.lock();
            slots.retain(|_, s| match s {
                Slot::Idle(s) => s.touched.elapsed() < IDLE,
                Slot::Busy { .. } => true,
            });
            if slots.len() >= MAX_SESSIONS {
                return Err(RegistryError::new(
                    Code::Unavailable,
                    format!("{MAX_SESSIONS} uploads are open; finish some first"),
                ));
            }
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let path = self.images.uploads_dir().join(&id);
        let file = tokio::fs::File::create(&path).await.map_err(io_failed)?;
        let session = Session {
            repository: repository.to_string(),
            path,
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            hasher: Sha256::new(),
            size: 0,
            written_back: 0,
            touched: Instant::now(),
        };
        self.lock()
            .insert(id.clone(), Slot::Idle(Box::new(session)));
        tracing::debug!(repository, upload = %id, "upload started");
        Ok(id)
    }

    /// Takes the session for one request.
    fn take(&self, id: &str, repository: &str) -> Result<Box<Session>, RegistryError> {
        let mut slots = self.lock();
        let ours = match slots.get(id) {
            None => false,
            Some(Slot::Busy { repository: r, .. }) => {
                if r == repository {
                    return Err(RegistryError::new(
                        Code::BlobUploadInvalid,
                        format!("upload {id} is being written by another request"),
                    ));
                }
                false
            }
            Some(Slot::Idle(s)) => s.repository == repository,
        };
        if !ours {
            return Err(unknown(id));
        }
        let busy = Slot::Busy {
            repository: repository.to_string(),
            size: 0,
        };
        match slots.insert(id.to_string(), busy) {
            Some(Slot::Idle(s)) => {
                if let Some(Slot::Busy { size, .. }) = slots.get_mut(id) {
                    *size = s.size;
                }
                Ok(s)
            }
            _ => Err(unknown(id)),
        }
    }

    fn put_back(&self, id: &str, mut session: Box<Session>) {
        session.touched = Instant::now();
        self.lock().insert(id.to_string(), Slot::Idle(session));
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Bytes received so far.
    pub fn status(&self, id: &str, repository: &str) -> Result<u64, RegistryError> {
        match self.lock().get(id) {
            Some(Slot::Idle(s)) if s.repository == repository => Ok(s.size),
            Some(Slot::Busy {
                repository: r,
                size,
            }) if r == repository => Ok(*size),
            _ => Err(unknown(id)),
        }
    }

    /// Appends `body`; with `start` (from `Content-Range`), only if it is
    /// where the upload stands. Returns the new size.
    pub async fn append(
        &self,
        id: &str,
        repository: &str,
        start: Option<u64>,
        body: Body,
    ) -> Result<u64, RegistryError> {
        let mut session = self.take(id, repository)?;
        if let Some(start) = start {
            if start != session.size {
                let size = session.size;
                self.put_back(id, session);
                return Err(RegistryError::new(
                    Code::RangeInvalid,
                    format!("chunk starts at byte {start}, but the upload has {size} bytes"),
                ));
            }
        }
        let r = write_body(&mut session, body).await;
        match r {
            Ok(()) => {
                let size = session.size;
                self.put_back(id, session);
                Ok(size)
            }
            Err(e) if e.code == Code::BlobUploadInvalid => {
                // The bytes that did arrive are written and hashed: the
                // client may ask where it stands and go on.
                self.put_back(id, session);
                Err(e)
            }
            Err(e) => {
                self.forget(id);
                Err(e)
            }
        }
    }

    /// Appends the last `body`, checks the whole upload hashes to `digest`,
    /// and stores it. The upload is gone afterwards either way. Returns
    /// whether the blob was new, and the upload's size.
    pub async fn finish(
        &self,
        id: &str,
        repository: &str,
        digest: &str,
        body: Body,
    ) -> Result<(bool, u64), RegistryError> {
        let mut session = self.take(id, repository)?;
        let result = self.finish_session(&mut session, digest, body).await;
        self.forget(id);
        let stored = result?;
        tracing::info!(repository, upload = %id, %digest, size = session.size, stored, "upload finished");
        Ok((stored, session.size))
    }

    async fn finish_session(
        &self,
        session: &mut Session,
        digest: &str,
        body: Body,
    ) -> Result<bool, RegistryError> {
        write_body(session, body).await?;
        session.file.flush().await.map_err(io_failed)?;
        let actual = ironmesh_oci::Digest::from_sha256(&session.hasher.clone().finalize());
        if actual.as_str() != digest {
            return Err(RegistryError::new(
                Code::DigestInvalid,
                format!(
                    "the upload's {} bytes hash to {actual}, not {digest}; nothing was stored",
                    session.size
                ),
            ));
        }
        session.file.get_ref().sync_all().await.map_err(io_failed)?;
        Ok(self.images.commit_blob_file(&session.path, digest).await?)
    }

    /// Drops an upload.
    pub fn cancel(&self, id: &str, repository: &str) -> Result<(), RegistryError> {
        self.status(id, repository)?;
        self.forget(id);
        Ok(())
    }
}

/// The `sha256:` digest a client named, checked.
pub fn check_digest(digest: &str) -> Result<(), RegistryError> {
    digest_hex(digest)
        .map(|_| ())
        .map_err(|e| RegistryError::new(Code::DigestInvalid, e))
}

async fn write_body(session: &mut Session, body: Body) -> Result<(), RegistryError> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(body_failed)?;
        session.file.write_all(&chunk).await.map_err(io_failed)?;
        session.hasher.update(&chunk);
        session.size += chunk.len() as u64;
        if session.size - session.written_back >= WRITEBACK_EVERY {
            session.file.flush().await.map_err(io_failed)?;
            start_writeback(session);
        }
    }
    session.file.flush().await.map_err(io_failed)?;
    Ok(())
}

/// Asks the kernel to start writing what was written since the last call
/// (it does not wait), overlapping the disk with the network; the fsync
/// when the upload finishes is still what makes it durable.
fn start_writeback(session: &mut Session) {
    use std::os::fd::AsRawFd;
    let fd = session.file.get_ref().as_raw_fd();
    let (from, len) = (session.written_back, session.size - session.written_back);
    // SAFETY: sync_file_range(2) on an open descriptor we own; it only
    // reads the arguments and touches no memory of ours.
    let rc = unsafe {
        libc::sync_file_range(
            fd,
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed; the final fsync does it all");
    }
    session.written_back = session.size;
}
