//! The files the server hands to browsers: Hearth's own (the client library, its worker
//! and wasm, the service worker, the types, the React hooks), embedded in the binary and
//! always served, and beside them either the embedded demo app or, with
//! [`ServerConfig::app_dir`](crate::ServerConfig::app_dir), the app's own static files
//! read from that directory.
//!
//! Hearth's own files may be loaded by pages of any origin (an app hosted elsewhere loads
//! `hearth.js` from the sync server, which imports its glue module and fetches its wasm
//! from there), so they carry `Access-Control-Allow-Origin: *`. The app's files do not.
//! Files whose names carry a content hash (`/pkg/hearth_page.0123456789abcdef.js`) never
//! change and are cached for a year; every other file is revalidated on each load (a
//! cheap 304 by ETag), so the stable entry points always name the current hashed files.

use std::path::{Component, Path, PathBuf};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::Asset;

/// Whether an embedded file at `path` is Hearth's own rather than the demo app's:
/// everything under `/pkg/`, and the top-level files named `hearth*`. Only the embedded
/// files are served as Hearth's; another such name is looked up like any app file.
pub fn is_hearth_own(path: &str) -> bool {
    path.starts_with("/pkg/")
        || path
            .strip_prefix('/')
            .is_some_and(|name| name.starts_with("hearth") && !name.contains('/'))
}

/// Whether a file name carries a content hash (`name.<16 hex digits>.ext`): such a URL
/// always holds the same bytes.
pub fn is_content_hashed(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut parts = name.rsplitn(3, '.');
    let (_ext, hash) = (parts.next(), parts.next());
    parts.next().is_some()
        && hash.is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

const CACHE_IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Revalidate on every use: the ETag makes that a 304 when nothing changed.
const CACHE_REVALIDATE: &str = "no-cache";

/// Answers a GET for `uri`: an embedded file of Hearth's, else the app's file from
/// `app_dir` (or, without one, the embedded demo app's).
pub async fn serve(
    assets: &'static [Asset],
    app_dir: Option<&Path>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    // One spelling per file: the path is percent-decoded before anything is matched, and
    // empty segments (`//name`) or encoded slashes are refused, so that Hearth's files
    // cannot be shadowed by another spelling of their names and no redirect below can
    // start with `//` (which a browser takes for another host).
    let path = match canonical_path(uri.path()) {
        Ok(path) => path,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("bad path: {why}\n")).into_response(),
    };
    let path = path.as_str();
    let embedded = |p: &str| assets.iter().find(|(asset, _, _)| *asset == p);
    // Hearth's files win over an app's file of the same name; any other name (an app's
    // `/hearthstone.png`) is the app's.
    if is_hearth_own(path) {
        if let Some((_, bytes, mime)) = embedded(path) {
            return respond(path, bytes.to_vec(), mime, headers, true);
        }
    }
    let Some(dir) = app_dir else {
        let path = if path == "/" { "/index.html" } else { path };
        return match embedded(path) {
            Some((_, bytes, mime)) => respond(path, bytes.to_vec(), mime, headers, false),
            None => not_found(),
        };
    };
    let relative = match relative_path(uri.path()) {
        Ok(relative) => relative,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("bad path: {why}\n")).into_response(),
    };
    let file = dir.join(&relative);
    // The app directory is canonical (see `start`): a file whose canonical path leaves it
    // (a symlink pointing out) is not served.
    let file = match tokio::fs::canonicalize(&file).await {
        Ok(file) if file.starts_with(dir) => file,
        _ => return not_found(),
    };
    if file.is_dir() {
        // `/docs` → `/docs/`, so that the index's relative links resolve inside it (the
        // path as sent, which `canonical_path` checked starts with one slash; the query
        // kept).
        let mut location = format!("{}/", uri.path().trim_end_matches('/'));
        if let Some(query) = uri.query() {
            location.push('?');
            location.push_str(query);
        }
        return (
            StatusCode::MOVED_PERMANENTLY,
            [(header::LOCATION, location)],
        )
            .into_response();
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => respond(path, bytes, content_type(&file), headers, false),
        Err(_) => not_found(),
    }
}

/// Whether a request's `If-None-Match` matches `etag` (a strong tag, quoted), as RFC
/// 9110 section 13.1.2 says: `*`, or a comma-separated list of tags (in one header or
/// several) compared weakly, so `W/"x"` matches `"x"`. A header that is not text matches
/// nothing.
pub fn if_none_match_hits(headers: &HeaderMap, etag: &str) -> bool {
    let opaque = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == opaque)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn respond(
    path: &str,
    bytes: Vec<u8>,
    mime: &str,
    headers: &HeaderMap,
    cross_origin: bool,
) -> Response {
    let etag = format!("\"{:016x}\"", fnv1a(&bytes));
    let cache = if is_content_hashed(path) {
        CACHE_IMMUTABLE
    } else {
        CACHE_REVALIDATE
    };
    let mut response = if if_none_match_hits(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = bytes.into_response();
        if let Ok(mime) = HeaderValue::from_str(mime) {
            response.headers_mut().insert(header::CONTENT_TYPE, mime);
        }
        response
    };
    let out = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, etag);
    }
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if cross_origin {
        // Module imports and wasm fetches from other origins are CORS requests; a page
        // that isolates itself (COEP) also needs the resource policy.
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        out.insert(
            "cross-origin-resource-policy",
            HeaderValue::from_static("cross-origin"),
        );
    }
    response
}

/// The URL path percent-decoded, or why it is refused: not UTF-8, an encoded `/` or `\`,
/// or an empty segment (`//`) anywhere but at the end.
pub fn canonical_path(url_path: &str) -> Result<String, &'static str> {
    let lower = url_path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err("an encoded slash or backslash");
    }
    let decoded = percent_decode(url_path).ok_or("bad percent-encoding or not UTF-8")?;
    let Some(rest) = decoded.strip_prefix('/') else {
        return Err("it does not start with /");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if !rest.is_empty() && rest.split('/').any(str::is_empty) {
        return Err("an empty segment (//)");
    }
    Ok(decoded)
}

/// The file path inside the app directory for a URL path: percent-decoded, `index.html`
/// for a directory (`/` included), and refused when a segment is `..` or `.`, holds a
/// backslash or NUL, or is not UTF-8: no URL reaches outside the directory.
pub fn relative_path(url_path: &str) -> Result<PathBuf, &'static str> {
    let decoded = percent_decode(url_path).ok_or("bad percent-encoding or not UTF-8")?;
    let mut relative = PathBuf::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err("a segment is . or ..");
        }
        if segment.contains(['\\', '\0']) {
            return Err("a segment holds a backslash or NUL");
        }
        relative.push(segment);
    }
    // Belt and braces: what was pushed is plain names only.
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err("not a plain relative path");
    }
    if decoded.ends_with('/') || relative.as_os_str().is_empty() {
        relative.push("index.html");
    }
    Ok(relative)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The content type of an app's file, by extension. Browsers refuse module scripts and
/// streamed wasm of the wrong type, and `nosniff` is set, so these matter.
pub fn content_type(file: &Path) -> &'static str {
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "ts" => "application/typescript; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly_and_takes_lists_and_star() {
        let etag = "\"00000000deadbeef\"";
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            }
            if_none_match_hits(&h, etag)
        };
        assert!(with(&["\"00000000deadbeef\""]));
        assert!(with(&["W/\"00000000deadbeef\""]), "weak comparison");
        assert!(with(&["*"]));
        assert!(with(&["\"other\", W/\"00000000deadbeef\""]), "a list");
        assert!(
            with(&["\"other\"", "\"00000000deadbeef\""]),
            "several headers"
        );
        assert!(!with(&[]));
        assert!(!with(&["\"other\""]));
        assert!(!with(&["\"00000000deadbee\""]));
    }

    #[test]
    fn hearth_own_files_are_told_from_the_demo_and_the_app() {
        for own in [
            "/hearth.js",
            "/hearth.mjs",
            "/hearth-worker.js",
            "/hearth-sw.js",
            "/hearth.d.ts",
            "/hearth-react.mjs",
            "/pkg/hearth_page.0123456789abcdef.js",
        ] {
            assert!(is_hearth_own(own), "{own}");
        }
        for app in [
            "/",
            "/index.html",
            "/app.js",
            "/sw.js",
            "/hearth/x.js",
            "/a/hearth.js",
        ] {
            assert!(!is_hearth_own(app), "{app}");
        }
    }

    #[test]
    fn content_hashed_names_are_recognised() {
        assert!(is_content_hashed("/pkg/hearth_page.0123456789abcdef.js"));
        assert!(is_content_hashed(
            "/pkg/hearth_page_bg.fedcba9876543210.wasm"
        ));
        assert!(!is_content_hashed("/pkg/hearth_page.js"));
        assert!(!is_content_hashed("/hearth.js"));
        assert!(!is_content_hashed("/pkg/x.0123456789abcdeg.js"));
        assert!(!is_content_hashed("/0123456789abcdef.js"));
    }

    #[test]
    fn one_spelling_per_path() {
        assert_eq!(canonical_path("/%68earth.js").unwrap(), "/hearth.js");
        assert_eq!(canonical_path("/hearth%2ejs").unwrap(), "/hearth.js");
        assert_eq!(canonical_path("/").unwrap(), "/");
        assert_eq!(canonical_path("/docs/").unwrap(), "/docs/");
        for bad in [
            "//hearth.js",
            "//evil.com",
            "/%2fhearth.js",
            "/a//b",
            "/a%2Fb",
            "/a%5cb",
            "x",
        ] {
            assert!(canonical_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_paths_map_inside_the_app_directory_or_are_refused() {
        let ok = |p: &str| relative_path(p).map(|r| r.to_string_lossy().into_owned());
        assert_eq!(ok("/").as_deref(), Ok("index.html"));
        assert_eq!(ok("/docs/").as_deref(), Ok("docs/index.html"));
        assert_eq!(ok("/a%20b/c.js").as_deref(), Ok("a b/c.js"));
        assert_eq!(ok("//x.css").as_deref(), Ok("x.css"));
        for bad in [
            "/../secret",
            "/a/../../secret",
            "/%2e%2e/secret",
            "/%2E%2E%2fsecret",
            "/a/%2e%2e%2f%2e%2e%2fsecret",
            "/./x",
            "/a%5c..%5csecret",
            "/a%00b",
            "/%zz",
            "/%ff",
        ] {
            assert!(relative_path(bad).is_err(), "{bad} was not refused");
        }
    }

    #[test]
    fn app_files_get_types_browsers_accept() {
        assert_eq!(
            content_type(Path::new("a/app.MJS")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.wasm")), "application/wasm");
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("blob")), "application/octet-stream");
    }
}
