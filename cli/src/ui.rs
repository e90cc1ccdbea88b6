//! `imctl ui`: the sign-in URL of the controller's web UI.
//!
//! Asks `CreateUiLogin` (as the operator of the imctl config, so the page
//! gets that operator's role) for a one-time code and prints
//! `https://<ui address>/login?code=…`; opening it in a browser within
//! five minutes signs in, once. See docs/ui.md.

use ironmesh_api::client_config::ClientConfig;
use ironmesh_proto::v1::CreateUiLoginRequest;

use crate::client;

pub async fn run(
    cfg: &ClientConfig,
    url_only: bool,
    status_err: fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    let mut api = client::connect(cfg).await?;
    let r = api
        .create_ui_login(CreateUiLoginRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if url_only {
        println!("{}", r.url);
    } else {
        println!(
            "Open this URL in a browser (it works once, until {}):",
            crate::ui::when(r.expires_unix)
        );
        println!("{}", r.url);
        eprintln!("The page uses the controller's certificate, signed by the cluster CA; trust that CA or accept the warning.");
    }
    Ok(())
}

/// RFC 3339 of Unix seconds.
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
