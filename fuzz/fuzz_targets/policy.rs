//! Policy files and the evaluation of whatever loads.
#![no_main]

use breakglass_core::Timestamp;
use breakglass_core::policy::{Action, PolicyEngine, PolicyInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(engine) = PolicyEngine::load(text, "fuzz.cedar") else { return };
    let groups = vec!["oncall".to_string()];
    let targets = vec!["production".to_string()];
    for action in [Action::Request, Action::Emergency] {
        let d = engine.evaluate(&PolicyInput {
            principal: "alice",
            principal_groups: &groups,
            target: "prod-db",
            target_groups: &targets,
            action,
            role: "read",
            duration_s: 900,
            reason: "fuzz",
            ticket: Some("INC-1"),
            now: Timestamp(1_800_000_000_000),
        });
        // Fail closed: an evaluation error never allows.
        assert!(d.errors.is_empty() || !d.allowed);
    }
});
