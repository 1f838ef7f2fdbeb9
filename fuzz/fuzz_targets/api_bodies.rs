//! API request bodies: any bytes give a value or a serde error.
#![no_main]

use breakglass_server::dto::{ApproveBody, CreateRequest, ReasonBody, ReviewBody};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<CreateRequest>(data);
    let _ = serde_json::from_slice::<ApproveBody>(data);
    let _ = serde_json::from_slice::<ReasonBody>(data);
    let _ = serde_json::from_slice::<ReviewBody>(data);
});
