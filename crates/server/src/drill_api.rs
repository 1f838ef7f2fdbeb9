//! The drills' HTTP API: run a drill now (optionally under load) and read
//! the report of past runs. Both are for admins: a run acts with the
//! drill's principals, and the report names requests of every drill.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use breakglass_core::Principal;
use breakglass_core::time::parse_report_window;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::app::{App, AppError, now};
use crate::drill::{self, DrillReport, RunAnswer, RunBody};
use crate::dto::Problem;
use crate::http::{ApiError, ApiQuery, Auth};

fn require_admin(who: &Principal, what: &str) -> Result<(), ApiError> {
    if who.admin {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "admin_only",
            format!("{what} is for members of the admin groups only"),
        )
        .into())
    }
}

#[utoipa::path(post, path = "/v1/drills/{name}/run",
    params(("name" = String, Path, description = "The drill's name, as in [[drills]]")),
    request_body(content = RunBody, description = "Optional: `{\"load\": {\"rate\": 500, \"for\": \"10s\"}}` runs the load generator meanwhile"),
    responses((status = 200, body = RunAnswer), (status = 400, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn run_drill(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<RunAnswer>, ApiError> {
    require_admin(&who, "running a drill")?;
    // An unknown drill is refused as such whatever the body says.
    drill::configured(&app, &name)?;
    let body: RunBody = if body.iter().all(u8::is_ascii_whitespace) {
        RunBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::BadInput(format!("invalid JSON body: {e}")))?
    };
    Ok(Json(drill::run_now(&app, &name, body).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportParams {
    /// How far back, like `30d` (the default) or `12h`; at most a year.
    since: Option<String>,
}

#[utoipa::path(get, path = "/v1/drills/report", params(ReportParams),
    responses((status = 200, body = DrillReport), (status = 400, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = [])))]
pub async fn drill_report(
    State(app): State<Arc<App>>,
    Auth(who): Auth,
    ApiQuery(p): ApiQuery<ReportParams>,
) -> Result<Json<DrillReport>, ApiError> {
    require_admin(&who, "the drill report")?;
    let s = parse_report_window(p.since.as_deref())
        .map_err(|e| AppError::BadInput(format!("since: {e}")))?;
    let since = now()
        .millis()
        .saturating_sub((s as i64).saturating_mul(1000));
    Ok(Json(
        drill::read_report(&app, breakglass_core::Timestamp::from_millis(since)).await?,
    ))
}
