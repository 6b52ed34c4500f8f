//! The controller's recent history: what it did and why, for `status` and the logs.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

/// Recent events kept.
const KEPT: usize = 200;

/// One line of history.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub deployment: String,
    pub message: String,
}

/// A bounded ring of events, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Events {
    list: VecDeque<Event>,
}

impl Events {
    /// Records an event (and logs it).
    pub fn push(&mut self, deployment: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(deployment, "{message}");
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.list.push_back(Event { time, deployment: deployment.to_string(), message });
        while self.list.len() > KEPT {
            self.list.pop_front();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_in_order() {
        let mut e = Events::default();
        for i in 0..KEPT + 5 {
            e.push("d", format!("event {i}"));
        }
        let kept: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0], "event 5");
        assert_eq!(kept[KEPT - 1], format!("event {}", KEPT + 4));
    }
}
