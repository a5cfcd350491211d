//! Request authentication: Slack's signing secret, checked on the raw body
//! before anything is parsed.

use axum::http::HeaderMap;
use slack_morphism::prelude::SlackSigningSecret;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;
use slack_morphism::signature_verifier::SlackEventSignatureVerifierError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MissingHeaders,
    BadSignature,
    Stale,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MissingHeaders => "missing_signature",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale_timestamp",
        }
    }
}

#[derive(Clone)]
pub struct Verifier {
    inner: SlackEventSignatureVerifier,
}

impl Verifier {
    pub fn new(signing_secret: &str) -> Self {
        Verifier {
            inner: SlackEventSignatureVerifier::new(&SlackSigningSecret::new(
                signing_secret.to_string(),
            )),
        }
    }

    /// HMAC-SHA256 over `v0:{ts}:{body}`, compared in constant time, with
    /// the timestamp within five minutes (replay protection).
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(sig), Some(ts)) = (
            header(SlackEventSignatureVerifier::SLACK_SIGNED_HASH_HEADER),
            header(SlackEventSignatureVerifier::SLACK_SIGNED_TIMESTAMP),
        ) else {
            return Err(Rejection::MissingHeaders);
        };
        let body = std::str::from_utf8(body).map_err(|_| Rejection::BadSignature)?;
        self.inner.verify(sig, body, ts).map_err(|e| match e {
            SlackEventSignatureVerifierError::IncorrectOrExpiredTimestampError(_) => {
                Rejection::Stale
            }
            _ => Rejection::BadSignature,
        })
    }
}
