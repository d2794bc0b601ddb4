//! What leaves the daemon: the event stream (`events`, `text` for terminals), the
//! Prometheus metrics (`metrics`), the HTTP server (`http`, protected by `web_config`), and
//! the live table behind `/api/v1/connections` (`live`).

pub mod events;
pub mod http;
pub mod live;
pub mod metrics;
pub mod text;
pub mod web_config;
