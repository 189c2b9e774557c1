//! What every test shares: one server started once per test binary, the model set it serves,
//! real photos and clips made with the `ffmpeg` CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use polyhead_client::{Client, ClientOptions};
use polyhead_proto::v1;
use polyhead_server::{Config, Pipeline};

/// The shared test server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub pipeline: Arc<Pipeline>,
}

static SERVER: OnceLock<TestServer> = OnceLock::new();

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model set under test: `POLYHEAD_TEST_MODELS`, else the generated `tiny` set.
pub fn models_dir() -> PathBuf {
    std::env::var_os("POLYHEAD_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/generated/tiny"))
}

/// Starts the shared server the first time it is asked for; it then serves every test of this
/// binary until the process exits. Its feature cache is off, so that every image request runs
/// the backbone whichever images other tests sent before.
pub fn server() -> &'static TestServer {
    SERVER.get_or_init(|| {
        let mut config = Config::for_models(models_dir());
        config.cache.cache_bytes = 0;
        start_server(config)
    })
}

/// Loads `config`'s model set and serves it on 127.0.0.1:0 from a runtime thread of its own,
/// until the process exits.
pub fn start_server(config: Config) -> TestServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("test server runtime");
            runtime.block_on(async move {
                let pipeline = polyhead_server::load(&config).await.unwrap_or_else(|e| {
                    panic!(
                        "loading {}: {e} (run `make setup`)",
                        config.models.display()
                    )
                });
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("local addr");
                tx.send((addr, Arc::clone(&pipeline)))
                    .expect("report address");
                polyhead_server::serve_loaded(&config, pipeline, listener, std::future::pending())
                    .await
                    .expect("serve");
            });
        })
        .expect("spawn test server");
    let (addr, pipeline) = rx.recv().expect("test server started");
    TestServer { addr, pipeline }
}

/// A client connected to the shared server.
pub async fn client() -> Client {
    connect(server().addr).await
}

/// A client connected to the server at `addr`.
pub async fn connect(addr: SocketAddr) -> Client {
    Client::connect(&addr.to_string(), ClientOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connect to the test server at {addr}: {e}"))
}

/// `width * height * 3` bytes of noise that `seed` determines (xorshift), so that a test can
/// send pixels no other test sends.
pub fn noise_rgb(seed: u64, width: u32, height: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..width * height * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

/// A real photo from `.cache/testdata` (extracted from the scikit-image wheel by `make setup`).
pub fn photo(name: &str) -> Vec<u8> {
    let path = root().join(".cache/testdata").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", path.display()))
}

/// An encoded image message.
pub fn encoded(bytes: Vec<u8>) -> v1::Image {
    v1::Image {
        source: Some(v1::image::Source::Encoded(bytes.into())),
    }
}

/// Makes a clip with the `ffmpeg` CLI from a lavfi source, e.g. `testsrc=size=160x120:rate=10`,
/// and returns its bytes.
pub fn make_clip(source: &str, seconds: f64, extension: &str, codec: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(format!("clip.{extension}"));
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            source,
            "-t",
        ])
        .arg(seconds.to_string())
        .args(codec)
        .arg(&out)
        .status()
        .expect("the ffmpeg CLI is needed to make test clips (make setup installs it)");
    assert!(status.success(), "ffmpeg failed to make {source}");
    std::fs::read(&out).expect("read clip")
}
