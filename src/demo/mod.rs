//! `spillway demo`: the sample [`app`] on a loopback port with spillway in front of it.

mod app;

use std::path::Path;
use std::process::ExitCode;

pub use app::DemoApp;

use crate::config::{self, Env};
use crate::server::ConfigSource;

/// The variable the demo config names its sample app by.
const DEMO_APP_VAR: &str = "SPILLWAY_DEMO_APP";

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
    // The config names the app through ${SPILLWAY_DEMO_APP}: handed to the loader (and to
    // every reload) rather than written into the process environment, which other threads may
    // be reading.
    let env = Env::default().with(DEMO_APP_VAR, app.local_addr().to_string());
    let (source, file, text) = if path.exists() {
        (
            path.display().to_string(),
            Some(path.to_path_buf()),
            config::read_file(path),
        )
    } else {
        (
            "built-in demo config".to_string(),
            None,
            Ok(embedded.to_owned()),
        )
    };
    let loaded = text.and_then(|text| {
        config::load_str_with(&text, &env).map(|loaded| (loaded, config::file_hash(&text)))
    });
    let (loaded, hash) = match loaded {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("spillway demo: {source} is invalid:\n{errors}");
            return ExitCode::from(crate::run::EXIT_BAD_CONFIG);
        }
    };
    let config_source = ConfigSource {
        loaded_hash: file.as_ref().map(|_| hash),
        path: file,
        env,
        watch: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(crate::run::run(loaded, config_source, Some(tx)));
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
