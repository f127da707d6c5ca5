//! Kiln for JavaScript: the wasm-bindgen layer behind the `kiln-gpu` npm package.
//!
//! This crate exposes the engine with a small, JSON-shaped surface; the JavaScript API of the
//! package (`js/kiln.js`: `Kiln.create`, `loadText`, `loadImage`, `loadEmbedding`, fetching, caching, workers,
//! `AbortSignal`) wraps it. Options cross the boundary as JSON strings and weights as byte
//! arrays, so the bindings need no serializer beyond `serde_json`.
//!
//! Everything here is browser-only; built natively the crate is empty.

#[cfg(target_arch = "wasm32")]
mod device;
#[cfg(target_arch = "wasm32")]
mod embed;
#[cfg(target_arch = "wasm32")]
mod files;
#[cfg(target_arch = "wasm32")]
mod image;
#[cfg(target_arch = "wasm32")]
mod panic;
#[cfg(target_arch = "wasm32")]
mod selftest;
#[cfg(target_arch = "wasm32")]
mod text;

#[cfg(target_arch = "wasm32")]
pub use device::{create_device, Device, Files};
#[cfg(target_arch = "wasm32")]
pub use embed::EmbeddingModel;
#[cfg(target_arch = "wasm32")]
pub use files::{model_files, shards_of};
#[cfg(target_arch = "wasm32")]
pub use image::ImageModel;
#[cfg(target_arch = "wasm32")]
pub use text::TextModel;
