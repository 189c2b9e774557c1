//! Client library for the polyhead inference service.
//!
//! [`Client`] is a thin, typed wrapper over the generated gRPC client: it connects eagerly,
//! sends a deadline with every call, retries what the server refuses for now and turns failures
//! into [`ClientError`]s with one-line messages. Requests and responses are the generated [`v1`]
//! messages; the helpers in this crate build the inputs ([`image_from_path`], [`raw_image`],
//! [`video_clip`], ...) and [`json`] mirrors the responses for serialisation.
//!
//! ```no_run
//! # async fn run() -> polyhead_client::Result<()> {
//! use polyhead_client::{Client, ClientOptions, image_from_path, v1};
//!
//! let client = Client::connect("127.0.0.1:50051", ClientOptions::default()).await?;
//! let image = image_from_path("street.jpg")?;
//! let response = client.detect(image, v1::DetectOptions::default(), "").await?;
//! for detection in response.detections.unwrap_or_default().detections {
//!     println!("{} {:.2}", detection.label, detection.score);
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod addr;
mod client;
mod deadline;
mod error;
mod input;
pub mod json;
mod retry;
mod windows;

pub use addr::normalize_addr;
pub use client::{Client, ClientOptions, ClientTls, DEFAULT_SERVER};
pub use deadline::Deadline;
pub use error::{ClientError, Result};
pub use input::{
    frames_clip, handle_image, image_from_bytes, image_from_path, raw_image, read_file, video_clip,
};
/// The type of every `bytes` field of the messages: cheap to clone, so one image can go out in
/// many calls without a copy for each.
pub use polyhead_proto::Bytes;
/// The generated `polyhead.v1` messages and stubs.
pub use polyhead_proto::v1;
pub use windows::WindowStream;
