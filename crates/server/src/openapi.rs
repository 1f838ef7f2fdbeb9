//! What the handlers' annotations cannot say in the OpenAPI document: the
//! error responses every operation can give (as `application/problem+json`
//! problem documents) and the constraints of the inputs, taken from the
//! same limits the core and the handlers enforce.

use breakglass_core::model::{
    COMMENT_LEN_MAX, NAME_LEN_MAX, NOTES_LEN_MAX, REASON_LEN_MAX, TICKET_LEN_MAX,
};
use breakglass_core::{ReviewOutcome, State};
use breakglass_store::PAGE_LEN_MAX;
use serde_json::Value;
use utoipa::Modify;
use utoipa::openapi::path::{Operation, Parameter};
use utoipa::openapi::schema::{AdditionalProperties, Object, Schema};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

use crate::http::{CURSOR_LEN_MAX, LIST_LEN_MAX, SEQ_MAX};

/// The media type of every error body (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Names as `check_name` accepts them: ASCII letters, digits and `- _ . @ :`.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9._@:-]+$";

/// Free text as the core accepts it: no control characters but newline and
/// tab.
const TEXT_PATTERN: &str = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*$";

/// Required free text: as [`TEXT_PATTERN`], with at least one character
/// that is not white space.
const REQUIRED_TEXT_PATTERN: &str =
    r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B-\x1F\x7F-\x9F]*$";

/// Durations as `parse_duration` reads them: digits and a unit (`s`, `m`,
/// `h`, `d`), repeated (`1h30m`), not zero. Over 7 days is refused with 403
/// like a policy's cap.
pub const DURATION_PATTERN: &str = "^([0-9]+[smhd])*[0-9]*[1-9][0-9]*[smhd]([0-9]+[smhd])*$";

/// Longest duration text accepted.
const DURATION_LEN_MAX: usize = 32;
/// A report's `since`: seconds, minutes or hours in few enough digits, or
/// at most 366 days.
const REPORT_WINDOW_PATTERN: &str = "^([1-9][0-9]{0,6}s|[1-9][0-9]{0,4}m|[1-9][0-9]{0,2}h|([1-9][0-9]?|[12][0-9]{2}|3[0-5][0-9]|36[0-6])d)$";

/// Adds the problem responses and input constraints (see the module doc).
pub struct Truth;

impl Modify for Truth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in [
                ("get", item.get.as_mut()),
                ("post", item.post.as_mut()),
                ("put", item.put.as_mut()),
                ("delete", item.delete.as_mut()),
                ("patch", item.patch.as_mut()),
            ] {
                if let Some(op) = op {
                    add_problems(method, path, op);
                    constrain_params(path, op);
                }
            }
        }
        if let Some(components) = openapi.components.as_mut() {
            for (name, schema) in components.schemas.iter_mut() {
                if let RefOr::T(Schema::Object(obj)) = schema {
                    constrain_body(name, obj);
                }
            }
        }
    }
}

/// The error statuses an operation can answer, with what each means there.
fn error_statuses(method: &str, path: &str, op: &Operation) -> Vec<(u16, &'static str)> {
    let has_body = op.request_body.is_some();
    let has_query = op.parameters.as_ref().is_some_and(|ps| {
        ps.iter()
            .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query))
    });
    let has_id = path.contains("{id}");
    let acts_on_request = method == "post" && path.starts_with("/v1/requests/{id}/");
    let admin_only = path.starts_with("/v1/audit");
    let mut out = Vec::new();
    if has_body || has_query || path == "/v1/requests" {
        out.push((
            400,
            "bad input: malformed JSON or query, a value out of its limits (`bad_request`, `invalid_request`)",
        ));
    }
    // The only operation without authentication.
    let public = path == "/v1/auth/config";
    if !public {
        out.push((
            401,
            "no or bad bearer token, with the reason (`unauthenticated`), or a local principal's TOTP code is missing (`otp_required`)",
        ));
    }
    if acts_on_request || admin_only || (method == "post" && path == "/v1/requests") {
        out.push((
            403,
            "refused by policy or authorization (`policy_denied`, `self_approval`, `not_eligible`, `admin_only`, `workload_not_allowed`, `step_up_required` (run `breakglass login --fresh`), ...)",
        ));
    }
    if has_id {
        out.push((
            404,
            "no such request or session visible to the caller (`not_found`)",
        ));
    }
    if method == "post" && path == "/v1/requests" {
        out.push((
            404,
            "no such target, or no such role on it (`unknown_target` names the close matches, `unknown_role`)",
        ));
    }
    if acts_on_request {
        out.push((
            409,
            "the request is not in a state that allows this (`wrong_state`, `already_approved`, `credential_limit`, ...)",
        ));
    }
    if has_body {
        out.push((413, "the body is larger than 64 KiB (`body_too_large`)"));
        out.push((415, "the body is not sent as `application/json`"));
    }
    out.push((429, "too many requests from this client; retry later"));
    out.push((
        503,
        "the store is unavailable, the audit chain is broken (writes and grant checks), or the server is at its connection cap",
    ));
    out
}

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn add_problems(method: &str, path: &str, op: &mut Operation) {
    // Declared error responses keep their description, with the problem
    // media type.
    for (status, resp) in op.responses.responses.iter_mut() {
        if status.starts_with('4') || status.starts_with('5') {
            let description = match resp {
                RefOr::T(r) => r.description.clone(),
                RefOr::Ref(_) => continue,
            };
            *resp = problem_response(&description);
        }
    }
    for (status, description) in error_statuses(method, path, op) {
        let key = status.to_string();
        match op.responses.responses.get_mut(&key) {
            Some(RefOr::T(r)) if r.description.is_empty() => {
                *r = match problem_response(description) {
                    RefOr::T(r) => r,
                    RefOr::Ref(_) => continue,
                };
            }
            Some(_) => {}
            None => {
                op.responses
                    .responses
                    .insert(key, problem_response(description));
            }
        }
    }
}

fn object_mut(schema: &mut RefOr<Schema>) -> Option<&mut Object> {
    match schema {
        RefOr::T(Schema::Object(obj)) => Some(obj),
        _ => None,
    }
}

fn constrain_params(path: &str, op: &mut Operation) {
    let page_len_max = if path == "/v1/requests" {
        LIST_LEN_MAX
    } else {
        PAGE_LEN_MAX
    };
    for p in op.parameters.iter_mut().flatten() {
        constrain_param(p, page_len_max);
    }
}

fn constrain_param(p: &mut Parameter, page_len_max: u32) {
    let Some(obj) = p.schema.as_mut().and_then(object_mut) else {
        return;
    };
    match p.name.as_str() {
        "state" => {
            obj.enum_values = Some(State::ALL.iter().map(|s| Value::from(s.as_str())).collect());
        }
        "after" if obj.format.is_none() => {
            // The request list's cursor (a request id).
            obj.min_length = Some(1);
            obj.max_length = Some(CURSOR_LEN_MAX);
        }
        "after" => {
            // A sequence number.
            obj.minimum = Some(0.into());
            obj.maximum = Some(SEQ_MAX.into());
        }
        "id_prefix" => {
            obj.min_length = Some(1);
            obj.max_length = Some(64);
            obj.pattern = Some("^[A-Za-z0-9_-]+$".to_string());
        }
        "limit" => {
            obj.minimum = Some(1.into());
            obj.maximum = Some(page_len_max.into());
        }
        "since" => {
            // A report's window: one term whose digits cannot pass
            // REPORT_WINDOW_MAX_S (a year). The server also reads compound
            // durations (`1d12h`), which this pattern leaves out.
            obj.min_length = Some(2);
            obj.max_length = Some(9);
            obj.pattern = Some(REPORT_WINDOW_PATTERN.to_string());
        }
        _ => {}
    }
}

fn set_string(obj: &mut Object, prop: &str, min: usize, max: usize, pattern: &str) {
    if let Some(p) = obj.properties.get_mut(prop).and_then(object_mut) {
        p.min_length = Some(min);
        p.max_length = Some(max);
        p.pattern = Some(pattern.to_string());
    }
}

fn constrain_body(name: &str, obj: &mut Object) {
    let closed = |obj: &mut Object| {
        obj.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
    };
    match name {
        "CreateRequest" => {
            closed(obj);
            set_string(obj, "target", 1, NAME_LEN_MAX, NAME_PATTERN);
            set_string(obj, "role", 1, NAME_LEN_MAX, NAME_PATTERN);
            set_string(obj, "duration", 2, DURATION_LEN_MAX, DURATION_PATTERN);
            set_string(obj, "reason", 1, REASON_LEN_MAX, REQUIRED_TEXT_PATTERN);
            set_string(obj, "ticket", 1, TICKET_LEN_MAX, REQUIRED_TEXT_PATTERN);
        }
        "ApproveBody" => {
            closed(obj);
            set_string(obj, "comment", 0, COMMENT_LEN_MAX, TEXT_PATTERN);
        }
        "ReasonBody" => {
            closed(obj);
            set_string(obj, "reason", 1, REASON_LEN_MAX, REQUIRED_TEXT_PATTERN);
        }
        "ReviewBody" => {
            closed(obj);
            if let Some(p) = obj.properties.get_mut("outcome").and_then(object_mut) {
                p.enum_values = Some(
                    [ReviewOutcome::Ok, ReviewOutcome::Misuse]
                        .iter()
                        .filter_map(|o| serde_json::to_value(o).ok())
                        .collect(),
                );
            }
            set_string(obj, "notes", 1, NOTES_LEN_MAX, REQUIRED_TEXT_PATTERN);
        }
        "IntrospectBody" => {
            closed(obj);
            // Any text is a question the answer to which is "not active":
            // no constraints beyond the body's size.
        }
        _ => {}
    }
}
