//! Pure reading of the TLS hellos (tls-parser): what a ClientHello asks for (server name,
//! protocols, versions), and what a gateway's ServerHello chose (version, cipher suite), for
//! deciding a connection's mode and for the records of passthrough connections, whose bytes
//! the proxy never decrypts.
#![forbid(unsafe_code)]

use tls_parser::{
    TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_plaintext, parse_tls_server_hello_extensions,
};

/// A record is at most 2^14 bytes of plaintext plus its header (RFC 8446 §5.1).
pub const MAX_RECORD: usize = 5 + (1 << 14);

/// What a client's hello asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// Versions offered, highest first (`TLSv1.3`, `TLSv1.2`).
    pub versions: Vec<String>,
}

/// What a gateway's hello chose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerHelloInfo {
    pub version: String,
    pub cipher: String,
    pub alpn: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello<T> {
    Parsed(T),
    /// More bytes are needed: at least this many in all.
    NeedMore(usize),
    /// Not a hello of that kind.
    Invalid(String),
}

/// How many bytes the first record takes, from its header; None until the header is in.
pub fn first_record_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= 5).then(|| 5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]])))
}

fn version_name(v: u16) -> String {
    match v {
        0x0304 => "TLSv1.3".into(),
        0x0303 => "TLSv1.2".into(),
        0x0302 => "TLSv1.1".into(),
        0x0301 => "TLSv1.0".into(),
        other => format!("0x{other:04x}"),
    }
}

/// The first handshake message of the first record, or what is missing.
fn first_handshake<T>(bytes: &[u8]) -> Result<TlsMessageHandshake<'_>, Hello<T>> {
    let Some(len) = first_record_len(bytes) else {
        return Err(Hello::NeedMore(5));
    };
    if bytes.len() < len {
        return Err(Hello::NeedMore(len));
    }
    match parse_tls_plaintext(&bytes[..len]) {
        Ok((_, mut record)) if !record.msg.is_empty() => match record.msg.swap_remove(0) {
            TlsMessage::Handshake(h) => Ok(h),
            _ => Err(Hello::Invalid(
                "the first TLS record is not a handshake".into(),
            )),
        },
        Ok(_) => Err(Hello::Invalid("an empty TLS record".into())),
        Err(e) => Err(Hello::Invalid(format!("not a TLS record: {e}"))),
    }
}

/// Parses a ClientHello from the first record.
pub fn client_hello(bytes: &[u8]) -> Hello<ClientHelloInfo> {
    let hello = match first_handshake(bytes) {
        Ok(TlsMessageHandshake::ClientHello(h)) => h,
        Ok(_) => return Hello::Invalid("the first TLS message is not a ClientHello".into()),
        Err(missing) => return missing,
    };
    let mut info = ClientHelloInfo::default();
    let extensions = match hello.ext.map(parse_tls_client_hello_extensions) {
        Some(Ok((_, ext))) => ext,
        Some(Err(e)) => return Hello::Invalid(format!("bad ClientHello extensions: {e}")),
        None => Vec::new(),
    };
    for ext in extensions {
        match ext {
            TlsExtension::SNI(names) => {
                info.sni = names
                    .iter()
                    .find_map(|(_, name)| std::str::from_utf8(name).ok().map(str::to_owned));
            }
            TlsExtension::ALPN(protocols) => {
                info.alpn = protocols
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
            }
            TlsExtension::SupportedVersions(versions) => {
                info.versions = versions
                    .iter()
                    // GREASE values (RFC 8701) are noise.
                    .filter(|v| v.0 & 0x0f0f != 0x0a0a)
                    .map(|v| version_name(v.0))
                    .collect();
            }
            _ => {}
        }
    }
    if info.versions.is_empty() {
        info.versions.push(version_name(hello.version.0));
    }
    Hello::Parsed(info)
}

/// Parses a ServerHello from the first record the gateway sent.
pub fn server_hello(bytes: &[u8]) -> Hello<ServerHelloInfo> {
    let hello = match first_handshake(bytes) {
        Ok(TlsMessageHandshake::ServerHello(h)) => h,
        Ok(_) => {
            return Hello::Invalid("the gateway's first TLS message is not a ServerHello".into());
        }
        Err(missing) => return missing,
    };
    let mut version = hello.version.0;
    let mut alpn = None;
    if let Some(Ok((_, extensions))) = hello.ext.map(parse_tls_server_hello_extensions) {
        for ext in extensions {
            match ext {
                // TLS 1.3 keeps 1.2 in the legacy field and says the truth here.
                TlsExtension::SupportedVersions(v) if !v.is_empty() => version = v[0].0,
                TlsExtension::ALPN(p) if !p.is_empty() => {
                    alpn = Some(String::from_utf8_lossy(p[0]).into_owned());
                }
                _ => {}
            }
        }
    }
    Hello::Parsed(ServerHelloInfo {
        version: version_name(version),
        cipher: hello.cipher.get_ciphersuite().map_or_else(
            || format!("0x{:04x}", hello.cipher.0),
            |c| c.name.to_owned(),
        ),
        alpn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, from rustls, offering `alpn` to `sni`.
    fn rustls_client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        roots.add(ca.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_server_hello_says_what_the_gateway_chose() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["gw".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        for (versions, want) in [
            (&[&rustls::version::TLS13][..], "TLSv1.3"),
            (&[&rustls::version::TLS12][..], "TLSv1.2"),
        ] {
            let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key.clone_key())
                .unwrap();
            server.alpn_protocols = vec![b"http/1.1".to_vec()];
            let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
            let hello = rustls_client_hello("gw", &["http/1.1"]);
            server.read_tls(&mut &hello[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut out = Vec::new();
            server.write_tls(&mut out).unwrap();
            let Hello::Parsed(info) = server_hello(&out) else {
                panic!("{want}: {:?}", server_hello(&out))
            };
            assert_eq!(info.version, want);
            assert!(info.cipher.starts_with("TLS"), "{}", info.cipher);
            if want == "TLSv1.2" {
                assert_eq!(info.alpn.as_deref(), Some("http/1.1"));
            }
        }
    }

    #[test]
    fn a_client_hello_says_what_it_wants() {
        let bytes = rustls_client_hello("mcp-gw.internal", &["h2", "http/1.1"]);
        let Hello::Parsed(info) = client_hello(&bytes) else {
            panic!("{:?}", client_hello(&bytes))
        };
        assert_eq!(info.sni.as_deref(), Some("mcp-gw.internal"));
        assert_eq!(info.alpn, ["h2", "http/1.1"]);
        assert_eq!(info.versions[0], "TLSv1.3");
        assert!(info.versions.contains(&"TLSv1.2".to_owned()));
        // Cut short: it says how much it needs.
        assert_eq!(client_hello(&bytes[..3]), Hello::NeedMore(5));
        assert_eq!(client_hello(&bytes[..10]), Hello::NeedMore(bytes.len()));
        assert!(matches!(
            client_hello(b"\x16\x03\x01\x00\x02\x00\x00"),
            Hello::Invalid(_)
        ));
        assert!(
            matches!(server_hello(&bytes), Hello::Invalid(_)),
            "not a ServerHello"
        );
    }
}
