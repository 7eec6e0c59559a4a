//! Which requests `mira dev`'s own routes answer (`/dev/*`, and the browser sessions of
//! `/api/session/*` it issues): loopback clients, addressed to a loopback name and the port the
//! gateway listens on, from its own origin, in JSON (DNS rebinding and cross-site forms).

use std::net::SocketAddr;

use axum::http::{header, HeaderMap};

/// Whether a client at `peer` may use `mira dev`'s sign-in: a loopback one, or any when
/// `allow_remote`. An unknown peer is not loopback.
fn sign_in_allowed(peer: Option<SocketAddr>, allow_remote: bool) -> bool {
    allow_remote || peer.is_some_and(|p| p.ip().is_loopback())
}

/// The host and port of a `Host` header (`127.0.0.1:8080` → (`127.0.0.1`, 8080), `[::1]:8080`
/// → (`::1`, 8080)); no port is 80. `None` when the port is not a number.
fn host_and_port(host: &str) -> Option<(&str, u16)> {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let (name, after) = rest.split_once(']')?;
            (name, after.strip_prefix(':'))
        }
        None => match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 80,
    };
    Some((name, port))
}

/// Why a request to a `/dev/*` route is refused, if it is. A loopback peer is not enough: a
/// page on any site can make a browser send requests to 127.0.0.1 under the page's own name
/// (DNS rebinding). So the request must also be addressed to a loopback name and the port
/// the gateway listens on (`served_on`; any name when `allow_remote`), come from that same
/// origin when it says where it comes from, and, for the sign-in, be JSON, which a cross-site
/// page cannot send without a preflight this gateway never grants.
pub fn dev_refusal(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    served_on: Option<SocketAddr>,
    allow_remote: bool,
    json: bool,
) -> Option<String> {
    if !sign_in_allowed(peer, allow_remote) {
        return Some("mira dev signs in loopback clients only (Web__AllowRemoteDevSignIn=true allows others)".into());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let Some((name, port)) = host_and_port(host) else {
        return Some(format!("mira dev cannot read the Host header {host:?}"));
    };
    if !allow_remote && !matches!(name, "127.0.0.1" | "localhost" | "::1") {
        return Some(format!(
            "mira dev answers /dev/ requests addressed to 127.0.0.1, localhost or [::1] only, not {host:?} (DNS rebinding)"
        ));
    }
    if let Some(on) = served_on {
        if on.port() != port {
            return Some(format!(
                "mira dev answers /dev/ requests addressed to its own port {}, not {host:?}",
                on.port()
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if origin.as_bytes() != format!("http://{host}").as_bytes() {
            return Some("mira dev answers /dev/ requests from its own origin only".into());
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if json && !content_type.starts_with("application/json") {
        return Some("mira dev's sign-in takes application/json only".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_routes_refuse_other_names_other_origins_and_forms() {
        let peer = Some("127.0.0.1:5".parse::<SocketAddr>().unwrap());
        let on = Some("127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        let req = |host: &str, origin: Option<&str>, ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            h
        };
        let json = "application/json";
        for host in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
            let origin = format!("http://{host}");
            assert_eq!(
                dev_refusal(&req(host, Some(&origin), json), peer, on, false, true),
                None,
                "{host}"
            );
            assert_eq!(
                dev_refusal(&req(host, None, json), peer, on, false, true),
                None,
                "{host}"
            );
        }
        let rebound = "rebind.attacker.example:8080";
        assert!(dev_refusal(
            &req(rebound, Some("http://rebind.attacker.example:8080"), "text/plain"),
            peer,
            on,
            false,
            true
        )
        .is_some());
        assert!(dev_refusal(&req(rebound, None, json), peer, on, false, true).is_some());
        assert!(dev_refusal(
            &req("127.0.0.1:8080", Some("http://evil.example"), json),
            peer,
            on,
            false,
            true
        )
        .is_some());
        assert!(dev_refusal(&req("127.0.0.1:8080", None, "text/plain"), peer, on, false, true).is_some());
        assert!(dev_refusal(&req("127.0.0.1.evil.example:8080", None, json), peer, on, false, true).is_some());
        // Another port of this machine (a rebound name pointed at 127.0.0.1 with the
        // attacker's port, or another local server's origin).
        assert!(dev_refusal(&req("127.0.0.1:9999", None, json), peer, on, false, true).is_some());
        assert!(dev_refusal(&req("localhost", None, json), peer, on, false, true).is_some());
        assert!(dev_refusal(&req("[::1]", None, json), peer, on, false, true).is_some());
        // The JWKS (a GET): any content type, the same names and port.
        assert_eq!(
            dev_refusal(&req("127.0.0.1:8080", None, "text/plain"), peer, on, false, false),
            None
        );
        assert!(dev_refusal(&req(rebound, None, json), peer, on, false, false).is_some());
        // Exposed on purpose: any name, still its own port, same-origin and JSON.
        assert_eq!(
            dev_refusal(&req("lab-box:8080", None, json), peer, on, true, true),
            None
        );
        assert!(dev_refusal(&req("lab-box:8081", None, json), peer, on, true, true).is_some());
        assert!(dev_refusal(&req("lab-box:8080", None, "text/plain"), peer, on, true, true).is_some());
    }

    #[test]
    fn only_loopback_clients_sign_in_unless_allowed() {
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert!(sign_in_allowed(at("127.0.0.1:5"), false));
        assert!(sign_in_allowed(at("[::1]:5"), false));
        assert!(!sign_in_allowed(at("192.168.1.9:5"), false));
        assert!(!sign_in_allowed(None, false));
        assert!(sign_in_allowed(at("192.168.1.9:5"), true));
    }
}
