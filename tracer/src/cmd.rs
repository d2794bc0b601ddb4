//! The commands besides `run` (which is `daemon::run`): `check`, `list` and `top`.

pub mod check;
pub mod list;
pub mod top;
