//! Finding the service token in a request's headers. Pure.
#![forbid(unsafe_code)]

use hyper::HeaderMap;

/// A token as it came, before anything is made of it. Its value is secret: it is hashed and
/// decoded, never stored, logged or put in an error message.
pub struct RawToken {
    /// Lower-case header name.
    pub header: String,
    /// `bearer`, `basic` or none (a header that carries the token bare).
    pub scheme: Option<String>,
    pub value: String,
}

impl std::fmt::Debug for RawToken {
    // The derived Debug would print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawToken")
            .field("header", &self.header)
            .field("scheme", &self.scheme)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The first token among the configured headers, in their order. `Authorization` takes a
/// scheme (`Bearer x`, `Basic x`); other headers may carry `Bearer x` or the bare token.
pub fn extract(headers: &HeaderMap, names: &[String]) -> Option<RawToken> {
    names.iter().find_map(|name| {
        let value = headers.get(name.as_str())?.to_str().ok()?.trim();
        // `Bearer` with nothing after it (the value was trimmed) carries no token.
        if value.is_empty()
            || value.eq_ignore_ascii_case("bearer")
            || value.eq_ignore_ascii_case("basic")
        {
            return None;
        }
        let (scheme, token) = match value.split_once(' ') {
            Some((s, rest))
                if s.eq_ignore_ascii_case("bearer") || s.eq_ignore_ascii_case("basic") =>
            {
                (Some(s.to_ascii_lowercase()), rest.trim())
            }
            _ if name == "authorization" => {
                // An unknown scheme: keep what follows it, or the whole value.
                match value.split_once(' ') {
                    Some((s, rest)) => (Some(s.to_ascii_lowercase()), rest.trim()),
                    None => (None, value),
                }
            }
            _ => (None, value),
        };
        (!token.is_empty()).then(|| RawToken {
            header: name.clone(),
            scheme,
            value: token.to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bearer_in_authorization() {
        let t = extract(
            &headers(&[("authorization", "Bearer abc.def.ghi")]),
            &names(&["authorization"]),
        )
        .unwrap();
        assert_eq!(
            (t.header.as_str(), t.scheme.as_deref(), t.value.as_str()),
            ("authorization", Some("bearer"), "abc.def.ghi")
        );
        assert!(
            !format!("{t:?}").contains("abc"),
            "Debug never shows the token"
        );
    }

    #[test]
    fn configured_headers_in_order() {
        let h = headers(&[("x-api-key", "opaque-123"), ("x-service-token", "Bearer t")]);
        let t = extract(
            &h,
            &names(&["authorization", "x-service-token", "x-api-key"]),
        )
        .unwrap();
        assert_eq!(
            (t.header.as_str(), t.value.as_str()),
            ("x-service-token", "t")
        );
        let t = extract(&h, &names(&["x-api-key"])).unwrap();
        assert_eq!((t.scheme, t.value.as_str()), (None, "opaque-123"));
    }

    #[test]
    fn basic_and_nothing() {
        let t = extract(
            &headers(&[("authorization", "basic dXNlcjpwYXNz")]),
            &names(&["authorization"]),
        )
        .unwrap();
        assert_eq!(t.scheme.as_deref(), Some("basic"));
        assert!(
            extract(
                &headers(&[("authorization", "Bearer ")]),
                &names(&["authorization"])
            )
            .is_none()
        );
        assert!(extract(&headers(&[]), &names(&["authorization"])).is_none());
    }
}
