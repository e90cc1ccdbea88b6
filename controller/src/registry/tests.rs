//! The registry's routes end to end in one process: requests through the
//! router as a client sends them (no TLS), answers checked against the
//! Distribution Spec.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use base64::Engine;
use tower::ServiceExt;

use super::*;
use crate::authz::Operators;
use crate::images::manifests::sha256_digest;
use crate::pki::ClusterCa;
use crate::revocation::Revocations;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

struct Fixture {
    _dir: tempfile::TempDir,
    router: axum::Router,
    images: ImageStore,
    /// Basic auth header of each operator.
    basic: std::collections::HashMap<&'static str, String>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let (ca, _) = ClusterCa::generate().unwrap();
    let rev = Revocations::start(store.clone()).await.unwrap();
    let ops = Operators::new(store.clone(), rev, Arc::new(ca));
    let images = ImageStore::open(dir.path().join("images"), store.clone()).unwrap();
    let auth = auth::RegistryAuth::new(store.clone(), ops.clone());
    let mut basic = std::collections::HashMap::new();
    for (name, role) in [("vera", "view"), ("ed", "edit"), ("root", "admin")] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("operator:{name}"));
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        ops.create(name, role, &csr, "test").await.unwrap();
        let c = auth.create_credential(name, 3600).await.unwrap();
        let v = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        basic.insert(name, format!("Basic {v}"));
    }
    let registry = Arc::new(Registry {
        uploads: uploads::Uploads::new(images.clone()),
        images: images.clone(),
        auth,
        advertised_host: "registry.test:5000".into(),
        metrics: Arc::new(crate::metrics::ControllerMetrics::new(
            &mut prometheus_client::registry::Registry::default(),
        )),
    });
    Fixture {
        _dir: dir,
        router: router(registry),
        images,
        basic,
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
}

impl Fixture {
    async fn call(
        &self,
        who: Option<&str>,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(w) = who {
            req = req.header(header::AUTHORIZATION, self.basic[w].clone());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Body::from(body)).unwrap();
        req.extensions_mut().insert(ConnectInfo(Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            cert: None,
        }));
        let resp: Response = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .unwrap()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256_digest(data);
        let a = self
            .call(
                Some("ed"),
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[],
                data.to_vec(),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        d
    }
}

#[tokio::test]
async fn discovery_needs_credentials_and_says_how_to_get_them() {
    let f = fixture().await;
    let a = f.call(None, "GET", "/v2/", &[], vec![]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.header("www-authenticate"),
        "Bearer realm=\"https://registry.test:5000/token\",service=\"ironmesh-registry\""
    );
    assert_eq!(a.code(), "UNAUTHORIZED");
    let a = f
        .call(
            None,
            "GET",
            "/v2/x/tags/list",
            &[("host", "10.0.0.1:5000")],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.header("www-authenticate")
            .contains("realm=\"https://10.0.0.1:5000/token\"")
            && a.header("www-authenticate")
                .contains("scope=\"repository:x:pull\""),
        "{}",
        a.header("www-authenticate")
    );
    let a = f.call(Some("vera"), "GET", "/v2/", &[], vec![]).await;
    assert_eq!(a.status, StatusCode::OK);

    // The token endpoint turns the basic credential into a bearer token.
    let a = f
        .call(
            Some("vera"),
            "GET",
            "/token?service=ironmesh-registry&scope=repository:x:pull",
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let mut req = Request::builder()
        .uri("/v2/")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(Peer {
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        cert: None,
    }));
    let resp = f.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let a = f.call(None, "GET", "/token", &[], vec![]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn chunked_upload_is_checked_as_it_streams_and_visible_only_when_complete() {
    let f = fixture().await;
    let data = b"hello, registry".to_vec();
    let digest = sha256_digest(&data);

    // A view operator may not start an upload.
    let a = f
        .call(Some("vera"), "POST", "/v2/app/blobs/uploads/", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );

    let a = f
        .call(Some("ed"), "POST", "/v2/app/blobs/uploads/", &[], vec![])
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let loc = a.header("location").to_string();
    assert!(loc.starts_with("/v2/app/blobs/uploads/"), "{loc}");
    assert_eq!(a.header("range"), "0-0");
    let a = f
        .call(
            Some("ed"),
            "PATCH",
            &loc,
            &[("content-range", "0-4")],
            data[..5].to_vec(),
        )
        .await;
    assert_eq!((a.status, a.header("range")), (StatusCode::ACCEPTED, "0-4"));
    // Out of order: 416, with where it stands.
    let a = f
        .call(
            Some("ed"),
            "PATCH",
            &loc,
            &[("content-range", "9-12")],
            data[9..].to_vec(),
        )
        .await;
    assert_eq!(
        (a.status, a.header("range")),
        (StatusCode::RANGE_NOT_SATISFIABLE, "0-4")
    );
    let a = f.call(Some("ed"), "GET", &loc, &[], vec![]).await;
    assert_eq!(
        (a.status, a.header("range")),
        (StatusCode::NO_CONTENT, "0-4")
    );
    // Not visible yet.
    let a = f
        .call(
            Some("vera"),
            "HEAD",
            &format!("/v2/app/blobs/{digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // The rest with the PUT; a wrong digest stores nothing.
    let wrong = sha256_digest(b"other");
    let a = f
        .call(
            Some("ed"),
            "PUT",
            &format!("{loc}?digest={wrong}"),
            &[],
            data[5..].to_vec(),
        )
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let a = f
        .call(
            Some("vera"),
            "HEAD",
            &format!("/v2/app/blobs/{wrong}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // The failed upload is gone.
    let a = f.call(Some("ed"), "GET", &loc, &[], vec![]).await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );

    // Again, right.
    let a = f
        .call(Some("ed"), "POST", "/v2/app/blobs/uploads/", &[], vec![])
        .await;
    let loc = a.header("location").to_string();
    f.call(Some("ed"), "PATCH", &loc, &[], data[..7].to_vec())
        .await;
    let a = f
        .call(
            Some("ed"),
            "PUT",
            &format!("{loc}?digest={}", digest.replace(':', "%3A")),
            &[],
            data[7..].to_vec(),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.header("location"), format!("/v2/app/blobs/{digest}"));
    assert_eq!(a.header("docker-content-digest"), digest);

    let a = f
        .call(
            Some("vera"),
            "HEAD",
            &format!("/v2/app/blobs/{digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("content-length"), data.len().to_string());
    assert!(a.body.is_empty());
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/app/blobs/{digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.body, data);
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/app/blobs/{digest}"),
            &[("range", "bytes=7-14")],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        a.header("content-range"),
        format!("bytes 7-14/{}", data.len())
    );
    assert_eq!(a.body, &data[7..15]);
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/app/blobs/{digest}"),
            &[("range", "bytes=99-")],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::RANGE_NOT_SATISFIABLE);

    // Mounted into another repository without an upload.
    let a = f
        .call(
            Some("ed"),
            "POST",
            &format!("/v2/other/blobs/uploads/?mount={digest}&from=app"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.header("location"), format!("/v2/other/blobs/{digest}"));
    // A mount of a blob the store lacks opens an upload instead.
    let a = f
        .call(
            Some("ed"),
            "POST",
            &format!("/v2/other/blobs/uploads/?mount={wrong}&from=app"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);

    // Unknown blobs, bad digests, bad names.
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/app/blobs/{wrong}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    let a = f
        .call(Some("vera"), "GET", "/v2/app/blobs/sha256:xyz", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let a = f
        .call(Some("vera"), "GET", "/v2/Bad/tags/list", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::BAD_REQUEST, "NAME_INVALID")
    );
    let a = f
        .call(
            Some("root"),
            "DELETE",
            &format!("/v2/app/blobs/{digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
}

#[tokio::test]
async fn manifests_tags_catalog_and_delete_follow_the_spec() {
    let f = fixture().await;
    let config = f.push_blob("a/b", b"{}").await;
    let layer_data = b"layer bytes".to_vec();
    let layer = sha256_digest(&layer_data);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_data.len()}],
    }))
    .unwrap();
    let mdigest = sha256_digest(&manifest);
    let put = |tag: &'static str| {
        let manifest = manifest.clone();
        let f = &f;
        async move {
            f.call(
                Some("ed"),
                "PUT",
                &format!("/v2/a/b/manifests/{tag}"),
                &[("content-type", mt)],
                manifest,
            )
            .await
        }
    };
    let a = put("1").await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let a = f
        .call(Some("vera"), "GET", "/v2/a/b/tags/list", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    f.push_blob("a/b", &layer_data).await;
    for tag in ["1", "2", "3", "latest"] {
        let a = put(tag).await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.header("docker-content-digest"), mdigest);
    }
    let a = f
        .call(
            Some("ed"),
            "PUT",
            "/v2/a/b/manifests/1",
            &[("content-type", mt)],
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );

    for r in ["2", mdigest.as_str()] {
        let a = f
            .call(
                Some("vera"),
                "GET",
                &format!("/v2/a/b/manifests/{r}"),
                &[],
                vec![],
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.header("content-type"), mt);
        assert_eq!(a.header("docker-content-digest"), mdigest);
        assert_eq!(a.body, manifest);
        let a = f
            .call(
                Some("vera"),
                "HEAD",
                &format!("/v2/a/b/manifests/{r}"),
                &[],
                vec![],
            )
            .await;
        assert_eq!(
            (a.status, a.header("content-length")),
            (StatusCode::OK, manifest.len().to_string().as_str())
        );
    }

    // Pagination.
    let a = f
        .call(Some("vera"), "GET", "/v2/a/b/tags/list?n=2", &[], vec![])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v, serde_json::json!({"name": "a/b", "tags": ["1", "2"]}));
    assert_eq!(
        a.header("link"),
        "</v2/a/b/tags/list?n=2&last=2>; rel=\"next\""
    );
    let a = f
        .call(
            Some("vera"),
            "GET",
            "/v2/a/b/tags/list?n=2&last=2",
            &[],
            vec![],
        )
        .await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["3", "latest"]));
    assert_eq!(a.header("link"), "");
    let a = f
        .call(Some("vera"), "GET", "/v2/_catalog", &[], vec![])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v, serde_json::json!({"repositories": ["a/b"]}));

    // Referrers: none yet, an empty index.
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/a/b/referrers/{mdigest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));

    // Delete: edit is refused, admin removes a tag, then the digest.
    let a = f
        .call(Some("ed"), "DELETE", "/v2/a/b/manifests/3", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );
    let a = f
        .call(Some("root"), "DELETE", "/v2/a/b/manifests/3", &[], vec![])
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let a = f
        .call(Some("vera"), "GET", "/v2/a/b/manifests/3", &[], vec![])
        .await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let a = f
        .call(
            Some("root"),
            "DELETE",
            &format!("/v2/a/b/manifests/{mdigest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    for r in ["1", "latest", mdigest.as_str()] {
        let a = f
            .call(
                Some("vera"),
                "GET",
                &format!("/v2/a/b/manifests/{r}"),
                &[],
                vec![],
            )
            .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{r}");
    }
}

#[tokio::test]
async fn garbage_collection_never_loses_an_upload_in_flight() {
    let f = fixture().await;
    let data = b"a layer still arriving".to_vec();
    let digest = sha256_digest(&data);
    let a = f
        .call(Some("ed"), "POST", "/v2/app/blobs/uploads/", &[], vec![])
        .await;
    let loc = a.header("location").to_string();
    f.call(Some("ed"), "PATCH", &loc, &[], data[..8].to_vec())
        .await;
    // Collection with no grace at all, mid-upload.
    f.images
        .collect_garbage(std::time::Duration::ZERO)
        .await
        .unwrap();
    let a = f
        .call(
            Some("ed"),
            "PUT",
            &format!("{loc}?digest={digest}"),
            &[],
            data[8..].to_vec(),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    // A finished upload no manifest names yet survives a collection
    // within the grace, and goes after it.
    let r = f
        .images
        .collect_garbage(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(r.blobs_removed, 0);
    let a = f
        .call(
            Some("vera"),
            "GET",
            &format!("/v2/app/blobs/{digest}"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(a.body, data);
    let r = f
        .images
        .collect_garbage(std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((r.blobs_removed, r.bytes_freed), (1, data.len() as u64));
}
