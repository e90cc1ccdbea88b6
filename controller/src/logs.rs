//! Relays instance logs from agents to operators (STUB).

use std::pin::Pin;

use futures::Stream;
use ironmesh_proto::v1::{LogsChunk, LogsRequest};
use tonic::Status;

use crate::resources::Resources;

pub type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsChunk, Status>> + Send>>;

#[derive(Clone, Default)]
pub struct LogRelay {}

impl LogRelay {
    pub async fn open(&self, _r: &Resources, _req: LogsRequest) -> Result<LogsStream, Status> {
        Err(Status::unimplemented("logs"))
    }
}
