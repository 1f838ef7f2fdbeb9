//! The OpenAPI document: the checked-in `docs/openapi.json` is exactly what
//! the server generates (refresh it with `UPDATE_EXPECT=1 cargo test -p
//! breakglass-server --test openapi_doc`), and it tells the whole truth
//! about errors and inputs.

use breakglass_server::http::ApiDoc;
use serde_json::Value;
use utoipa::OpenApi;

fn generated() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

#[test]
fn checked_in_document_is_the_generated_one() {
    expect_test::expect_file!["../../../docs/openapi.json"].assert_eq(&generated());
}

#[test]
fn every_operation_lists_its_errors_as_problem_documents() {
    let doc: Value = serde_json::from_str(&generated()).expect("JSON");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 14, "{} paths", paths.len());
    let mut wrong = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            // Only `GET /v1/auth/config` needs no token, so it has no 401.
            let public = op.get("security").is_none();
            if public && path != "/v1/auth/config" {
                wrong.push(format!("{method} {path}: no security requirement"));
            }
            for status in ["401", "429", "503"] {
                if status == "401" && public {
                    continue;
                }
                if !responses.contains_key(status) {
                    wrong.push(format!("{method} {path}: no {status}"));
                }
            }
            if path.contains("{id}") && !responses.contains_key("404") {
                wrong.push(format!("{method} {path}: no 404"));
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    if !responses.contains_key(status) {
                        wrong.push(format!("{method} {path}: no {status}"));
                    }
                }
            }
            for (status, resp) in responses {
                let error = status.starts_with('4') || status.starts_with('5');
                let problem = resp["content"]["application/problem+json"]["schema"]["$ref"]
                    == "#/components/schemas/Problem";
                if error && !problem {
                    wrong.push(format!(
                        "{method} {path}: {status} is not a problem document"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn inputs_carry_their_constraints() {
    let doc: Value = serde_json::from_str(&generated()).expect("JSON");
    let list = &doc["paths"]["/v1/requests"]["get"]["parameters"];
    let state = list
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "state")
        .expect("state parameter");
    let states: Vec<&str> = state["schema"]["enum"]
        .as_array()
        .expect("state enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        states.contains(&"pending") && states.contains(&"timed_out"),
        "{states:?}"
    );
    let create = &doc["components"]["schemas"]["CreateRequest"];
    assert_eq!(create["additionalProperties"], false);
    assert_eq!(create["properties"]["target"]["minLength"], 1);
    assert_eq!(
        create["properties"]["reason"]["maxLength"],
        breakglass_core::model::REASON_LEN_MAX
    );
    assert!(create["properties"]["duration"]["pattern"].is_string());
    assert_eq!(
        doc["components"]["schemas"]["ReviewBody"]["properties"]["outcome"]["enum"],
        serde_json::json!(["ok", "misuse"])
    );
}
