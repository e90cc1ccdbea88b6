//! What one instance's network is on this host: its namespace, veth and
//! address ([`crate::network`]) plus the datapath programs on its veth
//! ([`crate::datapath`]), set up and torn down together for the supervisor.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::datapath::Datapath;
use crate::network::Network;
use crate::supervisor::InstanceNetworking;

/// The supervisor's view of this host's instance networking.
pub struct HostNetworking {
    pub network: Arc<Network>,
    /// `Err` when the datapath could not be loaded (why): no instance is
    /// started then, since it would run without policy or anti-spoofing.
    pub datapath: Result<Arc<Datapath>, String>,
    /// The node proxy, told when instance networks come and go.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
}

#[tonic::async_trait]
impl InstanceNetworking for HostNetworking {
    fn netns_path(&self, instance: &str) -> PathBuf {
        self.network.netns_path(instance)
    }

    async fn setup(&self, instance: &str) -> Result<(Ipv4Addr, PathBuf), String> {
        let net = self
            .network
            .setup(instance)
            .await
            .map_err(|e| e.to_string())?;
        Ok((net.ip, net.netns_path))
    }

    async fn attach(&self, instance: &str, ip: Ipv4Addr) -> Result<(), String> {
        // Fail closed: an instance never runs without its datapath.
        let dp = self.datapath.clone().map_err(|why| {
            format!(
                "the datapath is not ready on this node, so no instance starts unprotected: {why}"
            )
        })?;
        let host_if = self.network.host_if(instance);
        // Attaching waits for RCU grace periods in the kernel (tens of ms):
        // not on a runtime worker.
        tokio::task::spawn_blocking(move || {
            dp.attach_instance(&host_if, ip)
                .map_err(|e| format!("attaching the datapath to {host_if}: {e}"))
        })
        .await
        .map_err(|e| format!("the datapath attach task failed: {e}"))??;
        if let Some(mesh) = &self.mesh {
            mesh.instance_up(instance, ip, self.network.netns_path(instance));
        }
        Ok(())
    }

    async fn teardown(&self, instance: &str) -> Result<(), String> {
        if let Some(mesh) = &self.mesh {
            mesh.instance_down(instance);
        }
        if let Ok(dp) = &self.datapath {
            let host_if = self.network.host_if(instance);
            dp.detach_instance(&host_if)
                .map_err(|e| format!("detaching the datapath from {host_if}: {e}"))?;
        }
        self.network
            .teardown(instance)
            .await
            .map_err(|e| e.to_string())
    }

    async fn cleanup_orphans(&self, keep: HashSet<String>) {
        match self.network.cleanup_orphans(&keep).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(removed = ?removed, "removed networks of instances that are gone")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot clean up leftover instance networks"),
        }
        if let Ok(dp) = &self.datapath {
            let ifs: HashSet<String> = keep.iter().map(|i| self.network.host_if(i)).collect();
            if let Err(e) = dp.retain_instances(&ifs) {
                tracing::warn!(error = %e, "cannot drop datapath hooks of instances that are gone");
            }
        }
    }
}
