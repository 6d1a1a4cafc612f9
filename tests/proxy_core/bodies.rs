//! Bodies stream both ways without buffering, and 8 MiB arrives intact.

use super::*;

#[tokio::test]
async fn bodies_stream_both_ways_without_buffering() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let client: Client<_, ChannelBody> = Client::builder(TokioExecutor::new()).build_http();
    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(b"chunk-0;")).await.unwrap();
    let resp = tokio::time::timeout(
        STEP,
        client.request(
            Request::post(p.url("/stream"))
                .body(ChannelBody(rx))
                .unwrap(),
        ),
    )
    .await
    .expect("head while the request body is still open")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Each chunk must come back before the next is sent: a proxy that buffered either body
    // whole would never answer.
    for i in 0..5 {
        if i > 0 {
            tx.send(Bytes::from(format!("chunk-{i};"))).await.unwrap();
        }
        let want = format!("chunk-{i};");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = tokio::time::timeout(STEP, body.frame())
                .await
                .expect("echoed chunk in time");
            let frame = frame.expect("body still open").expect("body ok");
            got.extend_from_slice(frame.data_ref().expect("data frame"));
        }
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }
    drop(tx);
    let rest = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("end in time")
        .expect("clean end");
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn eight_mib_body_streams_intact_both_ways() {
    const SIZE: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let data = pattern(SIZE);

    let client: Client<_, ChannelBody> = Client::builder(TokioExecutor::new()).build_http();
    let (tx, rx) = mpsc::channel(4);
    let sender = {
        let data = data.clone();
        tokio::spawn(async move {
            for off in (0..SIZE).step_by(CHUNK) {
                if tx.send(data.slice(off..off + CHUNK)).await.is_err() {
                    return;
                }
            }
        })
    };
    let fut = async {
        let resp = client
            .request(
                Request::post(p.url("/upload"))
                    .body(ChannelBody(rx))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body()
            .collect()
            .await
            .expect("whole body")
            .to_bytes()
    };
    let echoed = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("8 MiB round trip in time");
    sender.await.unwrap();
    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == data, "body corrupted in transit");
    let s = requests_series(200, "POST", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}
