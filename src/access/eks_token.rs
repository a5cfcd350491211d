//! Tollgate's own EKS bearer token, as `aws eks get-token` makes it: a
//! presigned STS GetCallerIdentity URL whose signature covers the
//! `x-k8s-aws-id` header naming the cluster. No `aws` binary needed.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningParams, SigningSettings,
};
use aws_sigv4::sign::v4;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::time::{Duration, SystemTime};

pub const TOKEN_PREFIX: &str = "k8s-aws-v1.";
pub const CLUSTER_ID_HEADER: &str = "x-k8s-aws-id";
/// EKS accepts a token for 15 minutes after its signing time; the presigned
/// URL itself only has to live long enough to be checked.
pub const PRESIGN_EXPIRY: Duration = Duration::from_secs(60);
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

pub fn sts_host(region: &str) -> String {
    format!("sts.{region}.amazonaws.com")
}

/// Builds the token for `cluster` from `credentials`, signed at `now`.
pub fn token(
    credentials: &Credentials,
    region: &str,
    cluster: &str,
    now: SystemTime,
) -> Result<String, String> {
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(PRESIGN_EXPIRY);
    let params: SigningParams<'_> = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let base = format!(
        "https://{}/?Action=GetCallerIdentity&Version=2011-06-15",
        sts_host(region)
    );
    let request = SignableRequest::new(
        "GET",
        base.as_str(),
        [(CLUSTER_ID_HEADER, cluster)].into_iter(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| format!("presigning STS request: {e}"))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| format!("presigning STS request: {e}"))?
        .into_parts();
    let mut url = url::Url::parse(&base).map_err(|e| format!("STS URL: {e}"))?;
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in instructions.into_parts().1 {
            query.append_pair(name, &value);
        }
    }
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(url.as_str())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn decode(token: &str) -> url::Url {
        let b64 = token.strip_prefix(TOKEN_PREFIX).unwrap();
        assert!(!b64.contains('='), "no padding");
        let bytes = URL_SAFE_NO_PAD.decode(b64).unwrap();
        url::Url::parse(std::str::from_utf8(&bytes).unwrap()).unwrap()
    }

    #[test]
    fn token_is_a_presigned_get_caller_identity_covering_the_cluster_header() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("session".into()),
            None,
            "test",
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_900_000);
        let t = token(&creds, "eu-west-1", "prod-cluster", now).unwrap();
        let url = decode(&t);
        assert_eq!(url.host_str(), Some("sts.eu-west-1.amazonaws.com"));
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(q["Action"], "GetCallerIdentity");
        assert_eq!(q["Version"], "2011-06-15");
        assert_eq!(q["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
        assert_eq!(q["X-Amz-Expires"], "60");
        assert_eq!(q["X-Amz-Date"], "20251123T121320Z");
        assert!(
            q["X-Amz-SignedHeaders"]
                .split(';')
                .any(|h| h == "x-k8s-aws-id"),
            "{q:?}"
        );
        assert!(
            q["X-Amz-Credential"].starts_with("AKIDEXAMPLE/20251123/eu-west-1/sts/aws4_request")
        );
        assert_eq!(q["X-Amz-Security-Token"], "session");
        assert_eq!(q["X-Amz-Signature"].len(), 64);
        assert!(
            !t.contains("wJalrXUtnFEMI"),
            "the secret key never appears in the token"
        );

        // The signature depends on the cluster named in the signed header.
        let other = decode(&token(&creds, "eu-west-1", "other-cluster", now).unwrap());
        let q2: HashMap<String, String> = other.query_pairs().into_owned().collect();
        assert_ne!(q["X-Amz-Signature"], q2["X-Amz-Signature"]);
    }
}
