//! The Rust end of the Ray bridge (`python/sluice_ray`, see its README for the protocol): this
//! process is the child of the job's Python driver; commands go out as JSON lines on stdout,
//! events come in as JSON lines on stdin. Nothing else may write to stdout in this mode (logs go
//! to stderr).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The protocol version this side speaks.
pub const PROTOCOL: u32 = 1;

/// What one replica asks of a node, as the driver takes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ActorOptions {
    pub num_cpus: f64,
    pub num_gpus: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    pub resources: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accelerator_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u32>,
    /// The key `max_replicas_per_node` counts under (one per deployment version).
    pub group: String,
    /// Pin to this node (per-node proxies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// With `node_id`: false pins hard (the actor never runs elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft: Option<bool>,
}

/// A command to the driver.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    Create {
        name: String,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        options: ActorOptions,
        startup_timeout_s: f64,
    },
    Kill {
        name: String,
        grace_s: f64,
    },
    List {
        id: String,
        prefix: String,
    },
    Shutdown,
}

/// A node of the cluster.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Node {
    pub node_id: String,
    pub node_ip: String,
    #[serde(default)]
    pub alive: bool,
    #[serde(default)]
    pub is_head: bool,
}

/// A text field the driver may send as `null` (Ray reports no node for an actor still waiting
/// for one): read as empty, like a missing one. Without this one such actor made its whole
/// event unreadable, and the event was dropped.
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A live actor found by `list`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListedActor {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub node_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub node_ip: String,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub addr: Option<String>,
}

/// An event from the driver. Unknown events are kept as `Other` (a newer driver may send
/// more), never an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Hello {
        #[serde(default)]
        protocol: u32,
        #[serde(default, deserialize_with = "nullable")]
        ray_version: String,
        #[serde(default, deserialize_with = "nullable")]
        node_id: String,
        #[serde(default, deserialize_with = "nullable")]
        node_ip: String,
        #[serde(default, deserialize_with = "nullable")]
        namespace: String,
    },
    NodeAdded(Node),
    NodeRemoved {
        node_id: String,
        #[serde(default, deserialize_with = "nullable")]
        node_ip: String,
    },
    Pending {
        name: String,
        #[serde(default, deserialize_with = "nullable")]
        kind: String,
        #[serde(default, deserialize_with = "nullable")]
        reason: String,
    },
    Ready {
        name: String,
        /// Empty where the actor could not ask Ray for its node (the event was dropped, and
        /// the replica counted as starting for good).
        #[serde(default, deserialize_with = "nullable")]
        node_id: String,
        node_ip: String,
        pid: u32,
        addr: String,
    },
    Failed {
        name: String,
        #[serde(default)]
        node_ip: Option<String>,
        message: String,
        #[serde(default, deserialize_with = "nullable")]
        log_tail: String,
    },
    Killed {
        name: String,
    },
    Exited {
        name: String,
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        node_ip: Option<String>,
        #[serde(default, deserialize_with = "nullable")]
        log_tail: String,
    },
    Died {
        name: String,
        #[serde(default)]
        node_ip: Option<String>,
        #[serde(default, deserialize_with = "nullable")]
        message: String,
    },
    Actors {
        #[serde(default)]
        id: Option<String>,
        actors: Vec<ListedActor>,
    },
    Error {
        #[serde(default)]
        op: Option<String>,
        #[serde(default)]
        name: Option<String>,
        message: String,
    },
    #[serde(other)]
    Other,
}

/// Writes commands to the driver; cheap to clone.
#[derive(Clone)]
pub struct Commands {
    tx: mpsc::UnboundedSender<Command>,
}

impl Commands {
    /// Queues a command (written in order by one task). False once the driver is gone.
    pub fn send(&self, command: Command) -> bool {
        self.tx.send(command).is_ok()
    }
}

/// Starts the bridge over this process's stdin and stdout: returns the command side and the
/// stream of events. The events end when the driver closes our stdin.
pub fn stdio() -> (Commands, mpsc::UnboundedReceiver<Event>) {
    over(tokio::io::stdin(), tokio::io::stdout())
}

/// The bridge over any pipe pair (tests use in-memory ones).
pub fn over<R, W>(input: R, output: W) -> (Commands, mpsc::UnboundedReceiver<Event>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Command>();
    tokio::spawn(write_commands(rx, output));
    let (events_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(input).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Event>(&line) {
                Ok(event) => {
                    if events_tx.send(event).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("ignoring an event from the Ray driver that does not parse ({e}): {line}")
                }
            }
        }
        tracing::info!("the Ray driver closed the bridge");
    });
    (Commands { tx }, events)
}

async fn write_commands<W: AsyncWrite + Unpin>(mut rx: mpsc::UnboundedReceiver<Command>, mut out: W) {
    while let Some(command) = rx.recv().await {
        let Ok(mut line) = serde_json::to_vec(&command) else { continue };
        line.push(b'\n');
        if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
            tracing::error!("cannot write to the Ray driver; its commands are lost");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_are_json_lines_and_events_parse_with_unknown_ones_kept() {
        let (driver_out, ours_in) = tokio::io::duplex(4096);
        let (ours_out, driver_in) = tokio::io::duplex(4096);
        let (commands, mut events) = over(ours_in, ours_out);
        commands.send(Command::Kill { name: "sluice:m:1".into(), grace_s: 2.5 });
        let mut lines = BufReader::new(driver_in).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, serde_json::json!({"op": "kill", "name": "sluice:m:1", "grace_s": 2.5}));
        let mut driver_out = driver_out;
        driver_out
            .write_all(
                b"{\"event\":\"ready\",\"id\":null,\"name\":\"a\",\"node_id\":\"n1\",\"node_ip\":\"127.100.0.2\",\"pid\":7,\"actor_pid\":6,\"addr\":\"127.100.0.2:4000\"}\n\
                  {\"event\":\"something_new\",\"x\":1}\nnot json\n{\"event\":\"died\",\"name\":\"a\",\"message\":\"node lost\"}\n",
            )
            .await
            .unwrap();
        match events.recv().await.unwrap() {
            Event::Ready { name, addr, pid, .. } => {
                assert_eq!((name.as_str(), addr.as_str(), pid), ("a", "127.100.0.2:4000", 7))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(events.recv().await.unwrap(), Event::Other));
        assert!(matches!(events.recv().await.unwrap(), Event::Died { .. }), "a bad line is skipped");
    }

    /// An actor still waiting for a node is listed with no node (`null`, as the driver sends
    /// it): the listing parses, so the previous run's actors in it are found and stopped (the
    /// whole event was dropped, and a restarted controller left them running).
    #[test]
    fn an_actor_listed_with_no_node_parses() {
        let line = r#"{"event":"actors","id":"startup","actors":[{"name":"sluice:m:1:old-0","state":"pending","node_id":null,"node_ip":null,"pid":null,"actor_pid":null,"addr":null}]}"#;
        match serde_json::from_str::<Event>(line).unwrap() {
            Event::Actors { id, actors } => {
                assert_eq!(id.as_deref(), Some("startup"));
                assert_eq!((actors[0].name.as_str(), actors[0].node_id.as_str()), ("sluice:m:1:old-0", ""));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ready_actor_that_could_not_name_its_node_parses() {
        let line = r#"{"event":"ready","id":"c1","name":"sluice:m:1:a-0","node_id":null,"node_ip":"10.0.0.2","pid":7,"addr":"10.0.0.2:9000"}"#;
        match serde_json::from_str::<Event>(line).unwrap() {
            Event::Ready { name, node_id, addr, .. } => {
                assert_eq!(
                    (name.as_str(), node_id.as_str(), addr.as_str()),
                    ("sluice:m:1:a-0", "", "10.0.0.2:9000")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
