//! Pure domain logic: no I/O, no SDK types. Everything here takes `now` as an
//! argument so tests can move time without sleeping.

pub mod audit;
pub mod backstop;
pub mod command;
pub mod directory;
pub mod duration;
pub mod form;
pub mod grant;
pub mod identity;
pub mod inbox;
pub mod integrity;
pub mod lifecycle;
pub mod namespaces;
pub mod policy;
pub mod rate;
pub mod readback;
pub mod request;
pub mod row_check;
pub mod standing;
pub mod text;
