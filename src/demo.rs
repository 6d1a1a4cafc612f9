//! `spillway demo`: the sample app on a loopback port with spillway in front of it.

use std::path::Path;
use std::process::ExitCode;

use crate::config;
use crate::demo_app::DemoApp;

/// Starts the sample app, then spillway with the demo config (from `path` when it exists,
/// else the embedded copy), prints what to try, and serves until Ctrl-C.
pub async fn run(path: &Path, embedded: &str) -> ExitCode {
    let app = match DemoApp::bind("127.0.0.1:0".parse().expect("literal address")).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("spillway demo: cannot start the sample app: {e}");
            return ExitCode::from(1);
        }
    };
    // The config names the app through ${SPILLWAY_DEMO_APP}. Set before any other thread of
    // ours reads the environment.
    std::env::set_var("SPILLWAY_DEMO_APP", app.local_addr().to_string());
    let (source, file, loaded) = if path.exists() {
        (
            path.display().to_string(),
            Some(path.to_path_buf()),
            config::load_file(path),
        )
    } else {
        (
            "built-in demo config".to_string(),
            None,
            config::load_str(embedded),
        )
    };
    let loaded = match loaded {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("spillway demo: {source} is invalid:\n{errors}");
            return ExitCode::from(2);
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(crate::cli::run(loaded, file, Some(tx)));
    if let Ok(addrs) = rx.await {
        let p = addrs
            .listeners
            .first()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let admin = addrs.admin.map(|a| a.to_string()).unwrap_or_default();
        println!(
            "\nspillway demo: sample app on {app}, spillway on http://{p}, admin on http://{admin} ({source})\n\
             Try:\n  \
             curl -i http://{p}/ok                    # 200 from the app, x-served-by: demo-app, spillway-demo\n  \
             curl -i http://{p}/status/500            # the app's own 500, passed through unchanged\n  \
             curl -i http://{p}/broken                # 502, Proxy-Status: ...; error=connection_refused\n  \
             curl -i 'http://{p}/slow?ms=3000'        # 504, Proxy-Status: ...; error=http_response_timeout\n  \
             curl -i 'http://{p}/flaky?p=0.5'         # the app fails half the time\n  \
             for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' 'http://{p}/slow?ms=500' & done; wait; echo\n  \
                                                     # 4 x 200, 2 x 503 (concurrency limit 4, Retry-After: 5)\n  \
             curl -N http://{p}/stream                # a streamed body\n  \
             curl -s http://{admin}/metrics | grep ^spillway_requests_total\n\
             Ctrl-C stops both.\n",
            app = app.local_addr(),
        );
    }
    let code = serving.await.unwrap_or(ExitCode::from(1));
    app.stop().await;
    code
}
