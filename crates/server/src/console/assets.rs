//! The console's static files, embedded in the binary: its stylesheet and
//! script, and `asciinema-player` 3.18.0 (vendored from npm with its
//! Apache-2.0 LICENSE in `vendor/asciinema-player/`).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::ConsoleState;

pub const CONSOLE_CSS: &str = include_str!("assets/console.css");
pub const CONSOLE_JS: &str = include_str!("assets/console.js");
pub const PLAYER_JS: &str = include_str!("vendor/asciinema-player/asciinema-player.min.js");
pub const PLAYER_CSS: &str = include_str!("vendor/asciinema-player/asciinema-player.css");

/// Cached by browsers for an hour; the files change only with the binary.
const CACHE: &str = "public, max-age=3600";

fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, CACHE)],
        body,
    )
}

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route(
            "/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route(
            "/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/assets/asciinema-player.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", PLAYER_JS) }),
        )
        .route(
            "/assets/asciinema-player.css",
            get(|| async { asset("text/css; charset=utf-8", PLAYER_CSS) }),
        )
}
