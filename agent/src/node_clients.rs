//! The node's gRPC clients to every controller, built from its current
//! identity. Image fetches and work-queue calls take the clients from here
//! at each call, so that once [`crate::renewal`] renews the certificate new
//! calls go out with the new one.

use std::sync::{Arc, RwLock};

use ironmesh_proto::v1::node_service_client::NodeServiceClient;
use tonic::transport::Channel;

use crate::node_identity::{IdentityError, NodeIdentity};

/// Clones share one set of clients.
#[derive(Clone)]
pub struct NodeClients {
    controllers: Arc<Vec<String>>,
    server_name: Option<String>,
    current: Arc<RwLock<Arc<Vec<NodeServiceClient<Channel>>>>>,
}

fn build(
    controllers: &[String],
    server_name: Option<&str>,
    id: &NodeIdentity,
) -> Result<Vec<NodeServiceClient<Channel>>, IdentityError> {
    controllers
        .iter()
        .map(|url| crate::image_fetch::node_client(url, id, server_name))
        .collect()
}

impl NodeClients {
    /// One client per controller URL, in order; each connects on first use.
    pub fn new(
        controllers: Vec<String>,
        server_name: Option<String>,
        id: &NodeIdentity,
    ) -> Result<NodeClients, IdentityError> {
        let clients = build(&controllers, server_name.as_deref(), id)?;
        Ok(NodeClients {
            controllers: Arc::new(controllers),
            server_name,
            current: Arc::new(RwLock::new(Arc::new(clients))),
        })
    }

    /// The clients now, first controller first.
    pub fn current(&self) -> Arc<Vec<NodeServiceClient<Channel>>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Builds the clients again with `id` (a renewed certificate).
    pub fn replace(&self, id: &NodeIdentity) -> Result<(), IdentityError> {
        let clients = build(&self.controllers, self.server_name.as_deref(), id)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(clients);
        Ok(())
    }
}
