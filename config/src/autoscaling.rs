//! `num_replicas: N | auto` and `autoscaling_config`, with Ray Serve's fields, defaults and
//! meaning. `num_replicas: auto` starts from Ray's auto defaults (target 2 ongoing requests per
//! replica, 1 to 100 replicas); keys given in `autoscaling_config` override them.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// `num_replicas`: a fixed count or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumReplicas {
    Fixed(u32),
    Auto,
}

impl<'de> Deserialize<'de> for NumReplicas {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumReplicas;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a replica count or `auto`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NumReplicas, E> {
                u32::try_from(v)
                    .map(NumReplicas::Fixed)
                    .map_err(|_| E::custom(format!("{v} replicas is too many")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NumReplicas, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("num_replicas cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NumReplicas, E> {
                match v {
                    "auto" => Ok(NumReplicas::Auto),
                    other => Err(E::custom(format!("expected a replica count or `auto`, got `{other}`"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `autoscaling_config` as written; unset keys take Ray's defaults in [`Autoscaling`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingConfig {
    pub target_ongoing_requests: Option<f64>,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub initial_replicas: Option<u32>,
    pub upscale_delay_s: Option<f64>,
    pub downscale_delay_s: Option<f64>,
    pub downscale_to_zero_delay_s: Option<f64>,
    pub upscaling_factor: Option<f64>,
    pub downscaling_factor: Option<f64>,
    pub smoothing_factor: Option<f64>,
    pub look_back_period_s: Option<f64>,
    pub metrics_interval_s: Option<f64>,
}

/// Resolved autoscaling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaling {
    /// In-flight + queued requests per replica to aim for. Ray's default 2.
    pub target_ongoing_requests: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Replicas at start. Default `min_replicas`.
    pub initial_replicas: u32,
    /// How long the signal must ask for more replicas before they are added. Default 30.
    pub upscale_delay_s: f64,
    /// How long it must ask for fewer before they are removed. Default 600.
    pub downscale_delay_s: f64,
    /// For the last step to zero replicas. Default `downscale_delay_s`.
    pub downscale_to_zero_delay_s: f64,
    /// Multiplies each upscale step (default `smoothing_factor`, 1.0).
    pub upscaling_factor: f64,
    /// Multiplies each downscale step (default `smoothing_factor`, 1.0).
    pub downscaling_factor: f64,
    /// Window the signal is averaged over. Default 30.
    pub look_back_period_s: f64,
    /// How often the signal is sampled and a decision made. Default 10.
    pub metrics_interval_s: f64,
}

impl AutoscalingConfig {
    /// Resolves against Ray's defaults: `auto` means target 2, 1..=100 replicas; a plain
    /// `autoscaling_config` means 1..=1 unless it says otherwise.
    pub fn resolve(&self, auto: bool) -> Autoscaling {
        let min = self.min_replicas.unwrap_or(1);
        let max = self.max_replicas.unwrap_or(if auto { 100 } else { min.max(1) });
        let smoothing = self.smoothing_factor.unwrap_or(1.0);
        let down = self.downscale_delay_s.unwrap_or(600.0);
        Autoscaling {
            target_ongoing_requests: self.target_ongoing_requests.unwrap_or(2.0),
            min_replicas: min,
            max_replicas: max,
            initial_replicas: self.initial_replicas.unwrap_or(min),
            upscale_delay_s: self.upscale_delay_s.unwrap_or(30.0),
            downscale_delay_s: down,
            downscale_to_zero_delay_s: self.downscale_to_zero_delay_s.unwrap_or(down),
            upscaling_factor: self.upscaling_factor.unwrap_or(smoothing),
            downscaling_factor: self.downscaling_factor.unwrap_or(smoothing),
            look_back_period_s: self.look_back_period_s.unwrap_or(30.0),
            metrics_interval_s: self.metrics_interval_s.unwrap_or(10.0),
        }
    }
}

impl Autoscaling {
    /// `replicas` held to `min_replicas..=max_replicas`.
    pub fn bound(&self, replicas: usize) -> usize {
        replicas.clamp(self.min_replicas as usize, self.max_replicas as usize)
    }

    /// Problems with the values, each as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.max_replicas < self.min_replicas || self.max_replicas == 0 {
            out.push((
                "max_replicas",
                format!("must be at least 1 and at least min_replicas ({})", self.min_replicas),
            ));
        }
        if !(self.min_replicas..=self.max_replicas).contains(&self.initial_replicas) {
            out.push(("initial_replicas", "must be between min_replicas and max_replicas".to_string()));
        }
        if !(self.target_ongoing_requests > 0.0 && self.target_ongoing_requests.is_finite()) {
            out.push(("target_ongoing_requests", "must be above 0 and finite".to_string()));
        }
        for (field, v) in [
            ("upscale_delay_s", self.upscale_delay_s),
            ("downscale_delay_s", self.downscale_delay_s),
            ("downscale_to_zero_delay_s", self.downscale_to_zero_delay_s),
        ] {
            if !(0.0..=crate::MAX_SECONDS).contains(&v) {
                out.push((field, format!("must be 0 to {:e} seconds", crate::MAX_SECONDS)));
            }
        }
        for (field, v) in
            [("upscaling_factor", self.upscaling_factor), ("downscaling_factor", self.downscaling_factor)]
        {
            if !(v > 0.0 && v.is_finite()) {
                out.push((field, "must be above 0".to_string()));
            }
        }
        for (field, v) in
            [("look_back_period_s", self.look_back_period_s), ("metrics_interval_s", self.metrics_interval_s)]
        {
            if !(v > 0.0 && v <= crate::MAX_SECONDS) {
                out.push((field, format!("must be above 0 seconds, at most {:e}", crate::MAX_SECONDS)));
            }
        }
        out
    }
}
