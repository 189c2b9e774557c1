//! End-to-end tests: the real server on 127.0.0.1:0 with the generated `tiny` demo model set,
//! real ONNX Runtime, real decoders, talked to through the client library.

mod batching;
mod cache;
mod common;
mod equivalence;
mod errors;
mod faults;
mod fixed_axes;
mod handles;
mod hostile;
mod images;
mod lifecycle;
mod limits;
mod loading;
mod oip;
mod placement;
mod process;
mod security;
mod telemetry;
mod video;
mod windows;
