//! This process seen as a node, in Ray's terms: status pages name it for the replica threads,
//! the controller and the proxy that run in it (replicas hosted elsewhere name their own).

use std::net::SocketAddr;

use sluice_controller::Status;

/// The node this process runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// The host's name (Linux: /proc/sys/kernel/hostname), else `localhost`.
    pub id: String,
    /// The REST frontend's address (127.0.0.1 when it listens on every interface).
    pub ip: String,
    pub pid: u32,
}

impl LocalNode {
    /// This process, serving REST on `http`.
    pub fn of_this_process(http: SocketAddr) -> Self {
        let id = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let ip = if http.ip().is_unspecified() { "127.0.0.1".to_string() } else { http.ip().to_string() };
        Self { id, ip, pid: std::process::id() }
    }

    /// Names this node on every replica of `status` that runs in this process (no node set).
    pub fn fill(&self, status: &mut Status) {
        let replicas = status
            .applications
            .values_mut()
            .flat_map(|a| a.deployments.values_mut())
            .flat_map(|d| d.versions.iter_mut())
            .flat_map(|v| v.replica_details.iter_mut())
            .filter(|r| r.node_id.is_none());
        for r in replicas {
            r.node_id = Some(self.id.clone());
            r.node_ip = Some(self.ip.clone());
            r.pid = Some(self.pid);
        }
    }
}
