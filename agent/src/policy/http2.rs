//! The `[http2]` section: the bounds an HTTP/2 client connection is held to. A client that
//! exceeds them (too many open streams, headers too large, a flood of resets or
//! CONTINUATION frames) is refused the stream or cut off, and the connection's record says
//! why; other connections are untouched.
#![forbid(unsafe_code)]

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Limits {
    /// Streams a client may have open at once on one connection (the proxy opens as many
    /// to the gateway, on one connection of its own).
    pub max_concurrent_streams: u32,
    /// Bytes of one request's header list, decoded (HPACK), CONTINUATION frames included.
    pub max_header_list_size: u32,
    /// The largest frame payload the proxy accepts (16 KiB to 16 MiB - 1, RFC 9113).
    pub max_frame_size: u32,
    /// Streams a client may reset before the proxy has taken them up, at any one time: past
    /// it the connection is cut off (the "rapid reset" attack, CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the proxy may have to reset because the client broke the protocol on them:
    /// past it the connection is cut off.
    pub max_local_error_reset_streams: usize,
    /// A client connection with nothing going on is asked to answer a ping this often; one
    /// that does not answer within the same time is closed. 0: never.
    pub keep_alive_interval_secs: u64,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            max_header_list_size: 64 * 1024,
            max_frame_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 100,
            keep_alive_interval_secs: 60,
        }
    }
}

impl Http2Limits {
    /// Why the limits cannot be used, in words for the policy's author.
    pub fn check(&self) -> Result<(), String> {
        if self.max_concurrent_streams == 0 {
            return Err("http2.max_concurrent_streams must be at least 1".into());
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err(format!(
                "http2.max_frame_size is {}; HTTP/2 allows 16384 to 16777215",
                self.max_frame_size
            ));
        }
        if self.max_header_list_size < 1024 {
            return Err(format!(
                "http2.max_header_list_size is {}; below 1024 bytes no real client fits",
                self.max_header_list_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_hold_and_bad_values_are_named() {
        assert_eq!(Http2Limits::default().check(), Ok(()));
        let frame = Http2Limits {
            max_frame_size: 1000,
            ..Default::default()
        };
        assert!(frame.check().unwrap_err().contains("16384"));
        let streams = Http2Limits {
            max_concurrent_streams: 0,
            ..Default::default()
        };
        assert!(
            streams
                .check()
                .unwrap_err()
                .contains("max_concurrent_streams")
        );
    }
}
