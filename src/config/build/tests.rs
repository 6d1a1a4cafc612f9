//! Tests of loading and validation, on the example config of the documentation.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

const EXAMPLE: &str = r#"server_id: spillway-1
listeners:
  - name: http
    address: 127.0.0.1:8080
admin:
  address: 127.0.0.1:9901
defaults:
  timeout: 30s
  retry_after: 5s
  concurrency: { max: 1000, queue: 0 }
  circuit_breaker: { enabled: false }
  maintenance: { enabled: false }
  retries: { attempts: 0 }
upstreams:
  app:
    endpoints: ["127.0.0.1:3000"]
    connect_timeout: 1s
    idle_timeout: 4s
routes:
  - name: checkout
    match: { path_prefix: /checkout, host: shop.example.com, methods: [GET, POST] }
    upstream: app
    timeout: 2s
    concurrency: { adaptive: { min: 4, max: 256 }, queue: 64, queue_timeout: 100ms, queue_target: 10ms, queue_interval: 200ms, shares: { sheddable: 0.4, normal: 0.8 } }
    circuit_breaker: { enabled: true, window: 10s, min_requests: 20, failure_ratio: 0.5, open_for: 10s, half_open_requests: 3, failure_codes: [502, 503, 504] }
    maintenance: { enabled: false, retry_after: 10m }
    retries: { attempts: 2, backoff: 25ms, budget: 0.2, min_per_second: 2.5 }
    priority: critical
    priority_header: X-Priority
  - name: default
    match: { path_prefix: / }
    upstream: app
"#;

fn load(text: &str) -> Result<Loaded, ConfigErrors> {
    load_str_with_env(text, |_| None)
}

fn ok(text: &str) -> Loaded {
    load(text).unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}"))
}

/// `(path, line, column, message)` of every error.
fn errors(text: &str) -> Vec<(String, Option<usize>, Option<usize>, String)> {
    match load(text) {
        Ok(_) => panic!("expected errors"),
        Err(ConfigErrors(errs)) => errs
            .into_iter()
            // The message with its hint, as one text.
            .map(|e| {
                let text = match &e.hint {
                    Some(h) => format!("{}; {h}", e.message),
                    None => e.message.clone(),
                };
                (e.path, e.line, e.column, text)
            })
            .collect(),
    }
}

/// The example with one exact piece of text replaced (which must be present).
fn edit(from: &str, to: &str) -> String {
    assert!(EXAMPLE.contains(from), "{from:?} not in the example");
    EXAMPLE.replacen(from, to, 1)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A minimal valid config to build small cases on.
const MINIMAL: &str = "\
listeners: [{ address: 127.0.0.1:0 }]
upstreams: { app: { endpoints: [\"127.0.0.1:3000\"] } }
routes:
  - { name: r, upstream: app }
";

#[test]
fn example_config_gives_exact_settings() {
    let loaded = ok(EXAMPLE);
    let expected = Settings {
        server_id: "spillway-1".into(),
        listeners: vec![ListenerSettings {
            name: "http".into(),
            address: "127.0.0.1:8080".parse().unwrap(),
            tls: None,
            max_connections: 10_000,
            max_request_header_bytes: 32 * 1024,
            max_request_headers: 100,
            header_timeout: secs(10),
            idle_timeout: secs(60),
        }],
        admin: Some("127.0.0.1:9901".parse().unwrap()),
        admin_allowed_hosts: Vec::new(),
        admin_metrics: None,
        admin_token_file: None,
        upstreams: BTreeMap::from([(
            "app".to_owned(),
            UpstreamSettings {
                endpoints: vec!["127.0.0.1:3000".into()],
                connect_timeout: secs(1),
                body_timeout: secs(30),
                max_idle: 64,
                max_connections: None,
                idle_timeout: secs(4),
                protocol: UpstreamProtocol::Http1,
                tls: None,
            },
        )]),
        routes: vec![
            RouteSettings {
                name: "checkout".into(),
                matcher: MatchSettings {
                    path_prefix: "/checkout".into(),
                    host: Some(HostMatch::Exact("shop.example.com".into())),
                    methods: vec!["GET".into(), "POST".into()],
                },
                upstream: "app".into(),
                upgrades: vec!["websocket".into()],
                policy: PolicySettings {
                    timeout: secs(2),
                    retry_after: secs(5),
                    concurrency: ConcurrencySettings {
                        limit: LimitSettings::Adaptive { min: 4, max: 256 },
                        queue: 64,
                        queue_timeout: ms(100),
                        queue_target: ms(10),
                        queue_interval: ms(200),
                        shares: Shares {
                            sheddable: 0.4,
                            normal: 0.8,
                        },
                    },
                    circuit_breaker: BreakerSettings {
                        enabled: true,
                        window: secs(10),
                        min_requests: 20,
                        failure_ratio: 0.5,
                        open_for: secs(10),
                        half_open_requests: 3,
                        failure_codes: vec![502, 503, 504],
                    },
                    maintenance: MaintenanceSettings {
                        enabled: false,
                        retry_after: secs(600),
                    },
                    retries: RetrySettings {
                        attempts: 2,
                        backoff: ms(25),
                        budget: 0.2,
                        min_per_second: 2.5,
                    },
                    priority: Priority::Critical,
                    priority_header: Some("x-priority".into()),
                },
            },
            RouteSettings {
                name: "default".into(),
                matcher: MatchSettings {
                    path_prefix: "/".into(),
                    host: None,
                    methods: vec![],
                },
                upstream: "app".into(),
                upgrades: vec!["websocket".into()],
                policy: PolicySettings {
                    timeout: secs(30),
                    retry_after: secs(5),
                    concurrency: ConcurrencySettings {
                        limit: LimitSettings::Fixed(1000),
                        queue: 0,
                        queue_timeout: ms(100),
                        queue_target: ms(5),
                        queue_interval: ms(100),
                        shares: Shares {
                            sheddable: 0.5,
                            normal: 0.9,
                        },
                    },
                    circuit_breaker: BreakerSettings {
                        enabled: false,
                        window: secs(10),
                        min_requests: 20,
                        failure_ratio: 0.5,
                        open_for: secs(10),
                        half_open_requests: 3,
                        failure_codes: vec![502, 503, 504],
                    },
                    maintenance: MaintenanceSettings {
                        enabled: false,
                        retry_after: secs(5),
                    },
                    retries: RetrySettings {
                        attempts: 0,
                        backoff: ms(25),
                        budget: 0.2,
                        min_per_second: 1.0,
                    },
                    priority: Priority::Normal,
                    priority_header: None,
                },
            },
        ],
        shutdown: ShutdownSettings {
            drain_delay: secs(5),
            drain_timeout: secs(30),
        },
        retry_after: secs(5),
        limits: LimitsSettings {
            memory_bytes: None,
            memory_soft: 0.8,
            memory_hard: 0.9,
        },
        access_log: AccessLogSettings {
            enabled: true,
            format: None,
            sample: 1.0,
            always_proxy_errors: true,
            always_5xx: true,
            always_slower_than: Some(secs(1)),
            request_fields: Vec::new(),
            response_fields: Vec::new(),
        },
    };
    assert_eq!(loaded.settings, expected);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.version.len(), 12);
    assert!(loaded.version.chars().all(|c| c.is_ascii_hexdigit()));
    // The built-in defaults are what the example spells out for the `default` route.
    assert_eq!(loaded.settings.routes[1].policy, defaults::policy());
}

#[test]
fn version_follows_the_expanded_text() {
    let a = ok(MINIMAL).version;
    assert_eq!(a, ok(MINIMAL).version);
    assert_ne!(a, ok(&format!("{MINIMAL}# changed\n")).version);
    let templated = MINIMAL.replace("127.0.0.1:3000", "${UP}");
    let with = |v: &'static str| {
        load_str_with_env(&templated, move |_| Some(v.into()))
            .unwrap()
            .version
    };
    assert_eq!(with("127.0.0.1:3000"), a);
    assert_ne!(with("127.0.0.1:3001"), a);
}

#[test]
fn omitted_sections_take_the_documented_defaults() {
    let s = ok(MINIMAL).settings;
    assert_eq!(s.server_id, "spillway");
    assert_eq!(s.admin, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(s.listeners[0].name, "http");
    assert_eq!(
        s.shutdown,
        ShutdownSettings {
            drain_delay: secs(5),
            drain_timeout: secs(30)
        }
    );
    assert_eq!(s.routes[0].matcher.path_prefix, "/");
    assert_eq!(s.routes[0].policy, defaults::policy());
    let u = &s.upstreams["app"];
    assert_eq!(
        (u.connect_timeout, u.idle_timeout, u.protocol),
        (secs(1), secs(4), UpstreamProtocol::Http1)
    );
}

#[test]
fn unknown_key_is_reported_at_the_key_itself() {
    let text = edit(
        "match: { path_prefix: /checkout,",
        "match: { path_prefix: /checkout, colour: red,",
    );
    assert_eq!(
        errors(&text),
        [(
            "routes[0].match.colour".to_owned(),
            Some(21),
            Some(38),
            "unknown key; expected one of `host`, `methods`, `path_prefix`".to_owned()
        )]
    );
    let text = edit("  timeout: 30s", "  timout: 30s");
    assert_eq!(
        errors(&text),
        [(
            "defaults.timout".to_owned(),
            Some(8),
            Some(3),
            "unknown key; did you mean `timeout`?".to_owned()
        )]
    );
}

/// Each broken file, and exactly what is reported for it, as `spillway check`, the log and
/// `POST /reload` render it: every mistake at once, in file order.
#[test]
fn broken_files_report_every_mistake_in_file_order() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "the four mistakes of the issue",
            "\
listeners:
  - name: http
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
defaults:
  timout: 5s
upstreams:
  app:
    endpoints: [\"127.0.0.1:3000\"]
    conect_timeout: 1s
routes:
  - name: api
    upstream: ap
    timeout: soon
",
            &[
                "defaults.timout: unknown key (line 7, column 3); did you mean `timeout`?",
                "upstreams.app.conect_timeout: unknown key (line 11, column 5); did you mean `connect_timeout`?",
                "routes[0].upstream: unknown upstream `ap` (line 14, column 15); did you mean `app`?",
                "routes[0].timeout: `soon` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m (line 15, column 14)",
            ],
        ),
        (
            "values of the wrong type, with what is accepted",
            "\
listeners: [{ address: 127.0.0.1:0 }]
upstreams:
  app:
    endpoints: \"127.0.0.1:3000\"
routes:
  - name: r
    upstream: app
    match: { methods: GET }
    concurrency: { max: -1, queue: lots, queue_timeout: 1s }
    retries: { attempts: \"2\" }
    circuit_breaker: { enabled: yes, failure_ratio: half, failure_codes: [502, 99999] }
    maintenance: 2
defaults: ~
",
            &[
                "upstreams.app.endpoints: expected a list, found `127.0.0.1:3000` (line 4, column 16)",
                "routes[0].match.methods: expected a list, found `GET` (line 8, column 23)",
                "routes[0].concurrency.max: expected a whole number from 0 to 4294967295, found `-1` (line 9, column 25)",
                "routes[0].concurrency.queue: expected a whole number from 0 to 4294967295, found `lots` (line 9, column 36)",
                "routes[0].retries.attempts: expected a whole number from 0 to 4294967295, found `\"2\"`: write it without quotes (line 10, column 26)",
                "routes[0].circuit_breaker.enabled: expected true or false, found `yes` (line 11, column 33)",
                "routes[0].circuit_breaker.failure_ratio: expected a number, found `half` (line 11, column 53)",
                "routes[0].circuit_breaker.failure_codes[1]: expected a whole number from 0 to 65535, found `99999` (line 11, column 80)",
                "routes[0].maintenance: expected a mapping, found `2` (line 12, column 18)",
                "defaults: expected a mapping, found `~` (line 13, column 11)",
            ],
        ),
        (
            "unknown keys anywhere, a repeated key, and a value kept as written",
            "\
listners: []
upstreams:
  app: { endpoints: [\"127.0.0.1:3000\"] }
  app: { endpoints: [\"127.0.0.1:3001\"], tsl: {} }
routes:
  - name: r
    upstream: app
    match: { path_prefix: /, colour: red }
    retries: { attempt: 2 }
    timeout: 0x1E
",
            &[
                "listners: unknown key (line 1, column 1); did you mean `listeners`?",
                "upstreams.app: duplicate key `app` (first given on line 3) (line 4, column 3)",
                "upstreams.app.tsl: unknown key (line 4, column 41); did you mean `tls`?",
                "routes[0].match.colour: unknown key; expected one of `host`, `methods`, `path_prefix` (line 8, column 30)",
                "routes[0].retries.attempt: unknown key (line 9, column 16); did you mean `attempts`?",
                "routes[0].timeout: `0x1E` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m (line 10, column 14)",
                "listeners: at least one listener is required",
            ],
        ),
        (
            "a value of the wrong type is one mistake, not also a missing one",
            "\
listeners: {}
upstreams: { app: { endpoints: [\"127.0.0.1:3000\"] } }
routes:
  - { name: [r], upstream: { app: 1 } }
",
            &[
                "listeners: expected a list, found a mapping (line 1, column 1)",
                "routes[0].name: expected a string, found a list (line 4, column 7)",
                "routes[0].upstream: expected a string, found a mapping (line 4, column 18)",
            ],
        ),
        (
            "a file that is no mapping",
            "- a\n- b\n",
            &["expected a mapping, found a list (line 1, column 1)"],
        ),
        (
            "a syntax error is all there is to say",
            "a: 1\na: 2\nb: [\n",
            &["did not find expected node content, while parsing a flow node (line 4, column 1)"],
        ),
    ];
    for (what, text, expected) in cases {
        let got: Vec<String> = match load(text) {
            Ok(_) => panic!("{what}: expected errors"),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        };
        assert_eq!(got, *expected, "{what}");
    }
}

/// What serde_yaml reads leniently, the structural pass lets through: any scalar where a
/// string goes, as written; an empty value where a mapping goes.
#[test]
fn scalars_where_strings_go_and_empty_sections_are_accepted() {
    let text = format!("{MINIMAL}server_id: 0x10\ndefaults:\nshutdown:\n");
    assert_eq!(ok(&text).settings.server_id, "0x10");
    let text = MINIMAL.replace("name: r", "name: 42");
    assert_eq!(ok(&text).settings.routes[0].name, "42");
}

#[test]
fn unknown_upstream_suggests_a_close_name_or_lists_the_known_ones() {
    let with = |name: &str| {
        edit(
            "    upstream: app\n    timeout: 2s",
            &format!("    upstream: {name}\n    timeout: 2s"),
        )
    };
    assert_eq!(
        errors(&with("ap")),
        [(
            "routes[0].upstream".to_owned(),
            Some(22),
            Some(15),
            "unknown upstream `ap`; did you mean `app`?".to_owned()
        )]
    );
    assert_eq!(
        errors(&with("backend"))[0].3,
        "unknown upstream `backend`; defined upstreams: app"
    );
    let none = MINIMAL
        .replace(
            "upstreams: { app: { endpoints: [\"127.0.0.1:3000\"] } }\n",
            "",
        )
        .replace("upstream: app", "upstream: ap");
    assert_eq!(
        errors(&none)[0].3,
        "unknown upstream `ap`: no upstreams are defined"
    );
}

#[test]
fn bad_duration_is_reported_at_its_value() {
    let text = edit("queue_timeout: 100ms", "queue_timeout: 100 parsecs");
    assert_eq!(
        errors(&text),
        [(
            "routes[0].concurrency.queue_timeout".to_owned(),
            Some(24),
            Some(78),
            "`100 parsecs` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m"
                .to_owned()
        )]
    );

    let text = edit("  timeout: 30s", "  timeout: 0s");
    assert_eq!(
        errors(&text),
        [(
            "defaults.timeout".to_owned(),
            Some(8),
            Some(12),
            "must be greater than zero".to_owned()
        )]
    );
}

#[test]
fn bad_address_is_reported_at_its_value() {
    let text = edit("address: 127.0.0.1:8080", "address: localhost:8080");
    assert_eq!(
        errors(&text),
        [(
            "listeners[0].address".to_owned(),
            Some(4),
            Some(14),
            "invalid address `localhost:8080`: expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080"
                .to_owned()
        )]
    );
}

#[test]
fn every_semantic_error_is_reported_in_file_order() {
    let text = EXAMPLE
        .replace("server_id: spillway-1", "server_id: spillway 1")
        .replace("address: 127.0.0.1:9901", "address: 127.0.0.1:99999")
        .replace("retry_after: 5s", "retry_after: soon")
        .replace("\"127.0.0.1:3000\"", "\"127.0.0.1:0\"")
        .replace("failure_ratio: 0.5", "failure_ratio: 1.5")
        .replace(
            "failure_codes: [502, 503, 504]",
            "failure_codes: [502, 703]",
        )
        .replace("retry_after: 10m", "retry_after: 0s")
        .replace("budget: 0.2", "budget: 2")
        .replace("  - name: default\n", "  - name: checkout\n")
        .replace("path_prefix: / }", "path_prefix: x }");
    let got: Vec<(String, Option<usize>)> = errors(&text).into_iter().map(|e| (e.0, e.1)).collect();
    let expected: Vec<(String, Option<usize>)> = [
        ("server_id", 1),
        ("admin.address", 6),
        ("defaults.retry_after", 9),
        ("upstreams.app.endpoints[0]", 16),
        ("routes[0].circuit_breaker.failure_ratio", 25),
        ("routes[0].circuit_breaker.failure_codes[1]", 25),
        ("routes[0].maintenance.retry_after", 26),
        ("routes[0].retries.budget", 27),
        ("routes[1].name", 30),
        ("routes[1].match.path_prefix", 31),
    ]
    .into_iter()
    .map(|(p, l)| (p.to_owned(), Some(l)))
    .collect();
    assert_eq!(got, expected);
}

#[test]
fn missing_required_fields_point_at_their_parent() {
    let text = "\
listeners:
  - name: a
    address: 127.0.0.1:0
  - address: 127.0.0.1:0
upstreams:
  app:
    endpoints: []
    protocol: http3
routes:
  - match: { path_prefix: /x }
";
    let got: Vec<_> = errors(text).into_iter().map(|e| (e.0, e.1, e.3)).collect();
    let expected = [
        (
            "listeners[1].name",
            4,
            "name is required when there are several listeners",
        ),
        (
            "upstreams.app.endpoints",
            7,
            "at least one endpoint (host:port) is required",
        ),
        (
            "upstreams.app.protocol",
            8,
            "unknown protocol `http3`: expected http1 or http2",
        ),
        (
            "routes[0].name",
            10,
            "name is required (it labels the route's metrics)",
        ),
        ("routes[0].upstream", 10, "upstream is required"),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(p, l, m)| (p.to_string(), Some(*l), m.to_string()))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn empty_sections_are_errors_without_a_line_when_absent() {
    let got: Vec<_> = errors("server_id: x\n")
        .into_iter()
        .map(|e| (e.0, e.1, e.3))
        .collect();
    assert_eq!(
        got,
        [
            (
                "listeners".to_owned(),
                None,
                "at least one listener is required".to_owned()
            ),
            (
                "routes".to_owned(),
                None,
                "at least one route is required".to_owned()
            ),
        ]
    );
    let got: Vec<_> = errors("listeners: []\nroutes: []\n")
        .into_iter()
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        got,
        [
            ("listeners".to_owned(), Some(1)),
            ("routes".to_owned(), Some(2))
        ]
    );
}

#[test]
fn empty_file_is_an_error() {
    assert_eq!(
        errors("# nothing yet\n"),
        [(String::new(), None, None, "config is empty".to_owned())]
    );
}

#[test]
fn type_errors_are_reported_with_every_other_mistake() {
    let text = edit("queue: 64", "queue: lots")
        .replace("upstream: app\n    timeout", "upstream: nope\n    timeout");
    assert_eq!(
        errors(&text),
        [
            (
                "routes[0].upstream".to_owned(),
                Some(22),
                Some(15),
                "unknown upstream `nope`; defined upstreams: app".to_owned()
            ),
            (
                "routes[0].concurrency.queue".to_owned(),
                Some(24),
                Some(59),
                "expected a whole number from 0 to 4294967295, found `lots`".to_owned()
            ),
        ]
    );
}

#[test]
fn unset_environment_variables_are_all_reported() {
    let text = edit("server_id: spillway-1", "server_id: ${POD_NAME}")
        .replace("127.0.0.1:8080", "${LISTEN}");
    assert_eq!(
        errors(&text),
        [
            (
                String::new(),
                Some(1),
                Some(12),
                "environment variable POD_NAME is not set (use ${POD_NAME:-default})".to_owned()
            ),
            (
                String::new(),
                Some(4),
                Some(14),
                "environment variable LISTEN is not set (use ${LISTEN:-default})".to_owned()
            ),
        ]
    );
}

#[test]
fn error_columns_refer_to_the_file_as_written() {
    // The expanded `${HOST}` is longer than the reference; the bad prefix after it must still
    // be reported where it stands in the file.
    let text = MINIMAL.replace(
        "  - { name: r, upstream: app }",
        "  - { name: r, upstream: app, match: { host: \"${HOST}\", path_prefix: nope } }",
    );
    let errs = load_str_with_env(&text, |_| {
        Some("a-rather-long-host-name.example.com".into())
    })
    .unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].path, "routes[0].match.path_prefix");
    assert_eq!((errs.0[0].line, errs.0[0].column), (Some(4), Some(70)));
}

#[test]
fn route_policy_overrides_defaults_field_by_field() {
    let text = "\
listeners: [{ address: 127.0.0.1:0 }]
defaults:
  timeout: 10s
  retry_after: 7s
  concurrency: { max: 50, queue: 10, queue_timeout: 1s, queue_target: 20ms, shares: { sheddable: 0.3 } }
  circuit_breaker: { enabled: true, window: 30s, failure_codes: [503] }
  retries: { attempts: 1, budget: 0.1, min_per_second: 0 }
  priority: sheddable
  priority_header: x-class
upstreams: { app: { endpoints: [\"app:3000\"] } }
routes:
  - name: a
    upstream: app
    concurrency: { queue: 5, shares: { normal: 0.7 } }
    circuit_breaker: { min_requests: 5 }
    retries: { backoff: 50ms }
    maintenance: { enabled: true }
    priority: Critical
  - name: b
    match: { path_prefix: /b }
    upstream: app
    retry_after: 1s
    concurrency: { adaptive: { max: 20 }, queue_interval: 1s }
    priority_header: X-Other
";
    let s = ok(text).settings;
    let a = &s.routes[0].policy;
    assert_eq!(a.timeout, secs(10));
    assert_eq!(a.retry_after, secs(7));
    assert_eq!(
        a.concurrency,
        ConcurrencySettings {
            limit: LimitSettings::Fixed(50),
            queue: 5,
            queue_timeout: secs(1),
            queue_target: ms(20),
            queue_interval: ms(100),
            shares: Shares {
                sheddable: 0.3,
                normal: 0.7
            },
        }
    );
    assert_eq!(
        a.circuit_breaker,
        BreakerSettings {
            enabled: true,
            window: secs(30),
            min_requests: 5,
            failure_ratio: 0.5,
            open_for: secs(10),
            half_open_requests: 3,
            failure_codes: vec![503],
        }
    );
    assert_eq!(
        a.retries,
        RetrySettings {
            attempts: 1,
            backoff: ms(50),
            budget: 0.1,
            min_per_second: 0.0,
        }
    );
    // Priority words ignore case; the header is inherited.
    assert_eq!(a.priority, Priority::Critical);
    assert_eq!(a.priority_header.as_deref(), Some("x-class"));
    // Maintenance inherits the effective Retry-After when it sets none.
    assert_eq!(
        a.maintenance,
        MaintenanceSettings {
            enabled: true,
            retry_after: secs(7)
        }
    );

    let b = &s.routes[1].policy;
    // A route's `adaptive` replaces the defaults' `max`; its missing min is the built-in one.
    assert_eq!(
        b.concurrency,
        ConcurrencySettings {
            limit: LimitSettings::Adaptive { min: 1, max: 20 },
            queue: 10,
            queue_timeout: secs(1),
            queue_target: ms(20),
            queue_interval: secs(1),
            shares: Shares {
                sheddable: 0.3,
                normal: 0.9
            },
        }
    );
    assert_eq!(
        b.maintenance,
        MaintenanceSettings {
            enabled: false,
            retry_after: secs(1)
        }
    );
    assert_eq!(b.priority, Priority::Sheddable);
    assert_eq!(b.priority_header.as_deref(), Some("x-other"));
}

#[test]
fn adaptive_blocks_merge_and_a_route_max_replaces_inherited_adaptive() {
    let text = MINIMAL.to_owned()
        + "defaults: { concurrency: { adaptive: { min: 8, max: 64 } } }\n"
        + "  - { name: s, upstream: app, match: { path_prefix: /s }, concurrency: { adaptive: { max: 32 } } }\n"
        + "  - { name: t, upstream: app, match: { path_prefix: /t }, concurrency: { max: 5 } }\n";
    // The appended routes belong to `routes`, which must be the last key: move defaults up.
    let text = text.replacen(
        "defaults: { concurrency: { adaptive: { min: 8, max: 64 } } }\n",
        "",
        1,
    );
    let text =
        format!("defaults: {{ concurrency: {{ adaptive: {{ min: 8, max: 64 }} }} }}\n{text}");
    let s = ok(&text).settings;
    let limits: Vec<_> = s
        .routes
        .iter()
        .map(|r| r.policy.concurrency.limit)
        .collect();
    assert_eq!(
        limits,
        [
            LimitSettings::Adaptive { min: 8, max: 64 },
            LimitSettings::Adaptive { min: 8, max: 32 },
            LimitSettings::Fixed(5),
        ]
    );
}

#[test]
fn max_and_adaptive_in_one_block_is_an_error_and_bounds_are_checked() {
    let text = edit(
        "concurrency: { max: 1000, queue: 0 }",
        "concurrency: { max: 1000, adaptive: { min: 1, max: 9 } }",
    )
    .replace(
        "adaptive: { min: 4, max: 256 }",
        "adaptive: { min: 300, max: 256 }",
    )
    .replace(
        "  - name: default\n",
        "  - name: default\n    concurrency: { max: 0 }\n",
    );
    let got: Vec<_> = errors(&text).into_iter().map(|e| (e.0, e.1, e.3)).collect();
    assert_eq!(
        got,
        [
            (
                "defaults.concurrency.adaptive".to_owned(),
                Some(10),
                "`max` and `adaptive` cannot both be set: give a fixed `max` or `adaptive: { min, max }`"
                    .to_owned()
            ),
            (
                "routes[0].concurrency.adaptive".to_owned(),
                Some(24),
                "adaptive min (300) must not exceed adaptive max (256)".to_owned()
            ),
            ("routes[1].concurrency.max".to_owned(), Some(31), "must be at least 1".to_owned()),
        ]
    );
}

#[test]
fn the_retry_floor_is_zero_or_more() {
    let text = MINIMAL.to_owned()
        + "  - { name: s, upstream: app, match: { path_prefix: /s }, retries: { min_per_second: -1 } }\n";
    let got: Vec<_> = errors(&text).into_iter().map(|e| (e.0, e.3)).collect();
    assert_eq!(
        got,
        [(
            "routes[1].retries.min_per_second".to_owned(),
            "min_per_second -1 must be 0 or more".to_owned()
        )]
    );
}

#[test]
fn priorities_priority_headers_shares_and_queue_timing_are_checked() {
    let text = MINIMAL.to_owned()
        + "  - name: s
    match: { path_prefix: /s }
    upstream: app
    priority: urgent
    priority_header: \"x priority\"
  - name: t
    match: { path_prefix: /t }
    upstream: app
    priority_header: Connection
    concurrency: { shares: { sheddable: 0.8, normal: 0.6 } }
  - name: u
    match: { path_prefix: /u }
    upstream: app
    concurrency: { queue_target: 0s, queue_interval: soon, shares: { sheddable: 0, normal: 1.5 } }
";
    let got: Vec<_> = errors(&text).into_iter().map(|e| (e.0, e.3)).collect();
    let want = [
        (
            "routes[1].priority",
            "unknown priority `urgent`: expected critical, normal or sheddable",
        ),
        (
            "routes[1].priority_header",
            "`x priority` is not a valid header name",
        ),
        (
            "routes[2].priority_header",
            "`Connection` is a hop-by-hop header, removed before forwarding: name another",
        ),
        (
            "routes[2].concurrency.shares",
            "shares.sheddable (0.8) must not exceed shares.normal (0.6): a sheddable request would get in where a normal one does not",
        ),
        (
            "routes[3].concurrency.queue_target",
            "must be greater than zero",
        ),
        (
            "routes[3].concurrency.queue_interval",
            "`soon` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m",
        ),
        (
            "routes[3].concurrency.shares.sheddable",
            "share 0 must be greater than 0 and at most 1",
        ),
        (
            "routes[3].concurrency.shares.normal",
            "share 1.5 must be greater than 0 and at most 1",
        ),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_mistake_in_defaults_is_reported_once() {
    let text =
        "defaults: { concurrency: { adaptive: { min: 9, max: 3 } }, retries: { budget: -1 } }\n"
            .to_owned()
            + MINIMAL
            + "  - { name: s, upstream: app, match: { path_prefix: /s } }\n";
    let got: Vec<_> = errors(&text).into_iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(
        got,
        [
            ("defaults.concurrency.adaptive".to_owned(), Some(1)),
            ("defaults.retries.budget".to_owned(), Some(1)),
        ]
    );
}

#[test]
fn shadowed_routes_and_unused_upstreams_are_warnings() {
    let text = "\
listeners: [{ address: 127.0.0.1:0 }]
upstreams:
  app: { endpoints: [\"127.0.0.1:3000\"] }
  v2: { endpoints: [\"127.0.0.1:3001\"] }
  spare: { endpoints: [\"127.0.0.1:3002\"] }
routes:
  - { name: health, upstream: app, match: { path_prefix: /healthz, methods: [GET] } }
  - { name: api, upstream: app, match: { path_prefix: /api, host: \"*.example.com\" } }
  - { name: api-v2, upstream: v2, match: { path_prefix: /api/v2, host: shop.example.com, methods: [GET] } }
  - { name: apix, upstream: app, match: { path_prefix: /apix, host: shop.example.com } }
  - { name: health-post, upstream: app, match: { path_prefix: /healthz, methods: [POST] } }
  - { name: all, upstream: app }
  - { name: late, upstream: app, match: { path_prefix: /late } }
";
    assert_eq!(
        ok(text).warnings,
        [
            "routes[2] (api-v2) is shadowed by routes[1] (api): it can never match",
            "routes[6] (late) is shadowed by routes[5] (all): it can never match",
            "upstream `spare` is not used by any route",
        ]
    );
}

#[test]
fn duplicate_upstream_keys_are_errors() {
    let text = MINIMAL.replace(
        "upstreams: { app: { endpoints: [\"127.0.0.1:3000\"] } }",
        "upstreams:\n  app: { endpoints: [\"127.0.0.1:3000\"] }\n  app: { endpoints: [\"127.0.0.1:4000\"] }",
    );
    assert_eq!(
        errors(&text),
        [(
            "upstreams.app".to_owned(),
            Some(4),
            Some(3),
            "duplicate key `app` (first given on line 3)".to_owned()
        )]
    );
}

#[test]
fn listener_names_tls_and_addresses() {
    let text = "\
listeners:
  - { name: web, address: 127.0.0.1:8080 }
  - { name: web, address: 127.0.0.1:8080 }
  - { name: \"we b\", address: \"[::1]:0\", tls: { cert_file: c.pem } }
  - { name: t, address: 0.0.0.0:0, tls: { cert_file: c.pem, key_file: k.pem, alpn: [h3] } }
admin: { address: 127.0.0.1:8080 }
upstreams: { app: { endpoints: [\"127.0.0.1:3000\"] } }
routes: [{ name: r, upstream: app }]
";
    let got: Vec<_> = errors(text).into_iter().map(|e| (e.0, e.1, e.3)).collect();
    let expected = [
        (
            "listeners[1].name",
            3,
            "duplicate listener name `web` (also listeners[0])",
        ),
        (
            "listeners[1].address",
            3,
            "address 127.0.0.1:8080 is already used by listeners[0]",
        ),
        (
            "listeners[2].name",
            4,
            "name `we b` may only contain letters, digits, `_`, `.` and `-`",
        ),
        (
            "listeners[2].tls.key_file",
            4,
            "key_file is required with cert_file",
        ),
        (
            "listeners[3].tls.alpn[0]",
            5,
            "unsupported ALPN protocol `h3`: expected h2 or http/1.1",
        ),
        (
            "admin.address",
            6,
            "address 127.0.0.1:8080 is already used by listeners[0]",
        ),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(p, l, m)| (p.to_string(), Some(*l), m.to_string()))
        .collect();
    assert_eq!(got, expected);

    let tls = "listeners: [{ address: 127.0.0.1:0, tls: { cert_file: c.pem, key_file: k.pem } }]\n";
    let s = ok(&MINIMAL.replace("listeners: [{ address: 127.0.0.1:0 }]\n", tls)).settings;
    assert_eq!(
        s.listeners[0].tls,
        Some(ListenerTlsSettings {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            alpn: vec!["h2".into(), "http/1.1".into()],
        })
    );
}

#[test]
fn match_rules_are_normalised_and_checked() {
    let route = |m: &str| {
        MINIMAL.replace(
            "{ name: r, upstream: app }",
            &format!("{{ name: r, upstream: app, match: {m} }}"),
        )
    };
    let matcher = |m: &str| ok(&route(m)).settings.routes[0].matcher.clone();
    assert_eq!(
        matcher("{ host: Shop.Example.COM, methods: [get, Post, GET] }"),
        MatchSettings {
            path_prefix: "/".into(),
            host: Some(HostMatch::Exact("shop.example.com".into())),
            methods: vec!["GET".into(), "POST".into()],
        }
    );
    assert_eq!(
        matcher("{ host: \"*.Example.com\" }").host,
        Some(HostMatch::Suffix(".example.com".into()))
    );
    assert_eq!(
        matcher("{ host: \"10.0.0.1\" }").host,
        Some(HostMatch::Exact("10.0.0.1".into()))
    );

    for (m, path, message) in [
        (
            "{ host: \"shop.example.com:8080\" }",
            "host",
            "host `shop.example.com:8080` must not include a port",
        ),
        (
            "{ host: \"a.*.com\" }",
            "host",
            "`a.*.com`: a wildcard is only allowed as a leading `*.`, e.g. *.example.com",
        ),
        (
            "{ methods: [\"GE T\"] }",
            "methods[0]",
            "`GE T` is not an HTTP method",
        ),
        (
            "{ path_prefix: \"/a?b\" }",
            "path_prefix",
            "path_prefix `/a?b` must be a plain path, without spaces, `?` or `#`",
        ),
    ] {
        let errs = errors(&route(m));
        assert_eq!(errs.len(), 1, "{m}: {errs:?}");
        assert_eq!(errs[0].0, format!("routes[0].match.{path}"), "{m}");
        assert_eq!(errs[0].3, message, "{m}");
    }
}

#[test]
fn route_names_must_be_unique_and_plain() {
    let text = MINIMAL.to_owned() + "  - { name: r, upstream: app, match: { path_prefix: /a } }\n  - { name: \"r/2\", upstream: app }\n";
    let got: Vec<_> = errors(&text).into_iter().map(|e| (e.0, e.3)).collect();
    assert_eq!(
        got,
        [
            (
                "routes[1].name".to_owned(),
                "duplicate route name `r` (also routes[0])".to_owned()
            ),
            (
                "routes[2].name".to_owned(),
                "name `r/2` may only contain letters, digits, `_`, `.` and `-`".to_owned()
            ),
        ]
    );
}

#[test]
fn server_id_goes_into_headers_so_must_be_a_plain_token() {
    for bad in ["\"\"", "\"a b\"", "a,b", "\"caf\u{e9}\""] {
        let errs = errors(&format!("server_id: {bad}\n{MINIMAL}"));
        assert_eq!(errs.len(), 1, "{bad}");
        assert_eq!(errs[0].0, "server_id");
    }
    assert_eq!(
        ok(&format!("server_id: edge-1.eu/a_b\n{MINIMAL}"))
            .settings
            .server_id,
        "edge-1.eu/a_b"
    );
}

#[test]
fn endpoints_are_host_and_port() {
    for good in [
        "127.0.0.1:3000",
        "app:1",
        "app.default.svc.cluster.local.:65535",
        "[::1]:8080",
        "my_app:80",
    ] {
        assert_eq!(check_endpoint(good), Ok(()), "{good}");
    }
    for (bad, why) in [
        ("127.0.0.1", "needs a port"),
        ("app:0", "port must be a number from 1 to 65535"),
        ("app:65536", "port must be a number from 1 to 65535"),
        ("::1:80", "IPv6 addresses must be in brackets"),
        ("[::g]:80", "is not an IPv6 address"),
        ("[::1]", "needs a port"),
        ("http://app:80", "without a scheme"),
        ("256.1.1.1:80", "is not a valid IPv4 address"),
        ("-app:80", "is not a valid host name"),
        ("a..b:80", "is not a valid host name"),
        (":80", "is not a valid host name"),
    ] {
        let err = check_endpoint(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn the_admin_plane_keys_are_read_and_checked() {
    let split = edit(
        "  address: 127.0.0.1:9901\n",
        "  address: 127.0.0.1:9901\n  metrics_address: 0.0.0.0:9902\n  token_file: /run/secrets/admin-token\n",
    );
    let s = ok(&split).settings;
    assert_eq!(s.admin_metrics, Some("0.0.0.0:9902".parse().unwrap()));
    assert_eq!(
        s.admin_token_file,
        Some(std::path::PathBuf::from("/run/secrets/admin-token"))
    );
    assert_eq!(ok(EXAMPLE).settings.admin_metrics, None, "off by default");
    assert!(ok(&split).warnings.is_empty(), "{:?}", ok(&split).warnings);

    let clash = edit(
        "  address: 127.0.0.1:9901\n",
        "  address: 127.0.0.1:9901\n  metrics_address: 127.0.0.1:9901\n  token_file: \" \"\n",
    );
    let got: Vec<_> = errors(&clash).into_iter().map(|e| (e.0, e.3)).collect();
    assert_eq!(
        got,
        [
            (
                "admin.metrics_address".to_owned(),
                "address 127.0.0.1:9901 is already used by admin".to_owned()
            ),
            (
                "admin.token_file".to_owned(),
                "file path must not be empty".to_owned()
            ),
        ]
    );
    let bad = edit(
        "  address: 127.0.0.1:9901\n",
        "  address: 127.0.0.1:9901\n  metrics_address: everywhere\n",
    );
    assert_eq!(errors(&bad)[0].0, "admin.metrics_address");
}

#[test]
fn an_open_admin_without_a_token_is_a_warning() {
    let open = edit("  address: 127.0.0.1:9901\n", "  address: 0.0.0.0:9901\n");
    let warnings = ok(&open).warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("admin.address 0.0.0.0:9901 is reachable from other hosts"));
    let with_token = edit(
        "  address: 127.0.0.1:9901\n",
        "  address: 0.0.0.0:9901\n  token_file: /etc/spillway/admin-token\n",
    );
    assert!(ok(&with_token).warnings.is_empty());
}
