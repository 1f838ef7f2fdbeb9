//! The pure core of breakglass: the request lifecycle, policy evaluation,
//! the audit chain and token handling.
//!
//! Nothing here does IO or reads a clock: time is passed in, randomness is
//! passed in, and every function returns its reasons. The store, the service
//! and the gateways are built on top.

pub mod audit;
pub mod lifecycle;
pub mod merkle;
pub mod model;
pub mod policy;
pub mod slots;
pub mod time;
pub mod token;

pub use lifecycle::{Command, EventDraft, LifecycleError, NewRequest, Transition};
pub use model::{
    Actor, Approval, AuthMethod, Authn, EndReason, Principal, PrincipalKind, Request, Review,
    ReviewOutcome, State,
};
pub use time::Timestamp;
