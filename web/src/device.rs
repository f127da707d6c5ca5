//! The GPU device and the set of model files handed over from JavaScript.

use kiln::llm::ModelFiles;
use kiln::{Gpu, GpuOptions};
use serde_json::json;
use std::sync::Arc;
use wasm_bindgen::prelude::*;

/// An engine error as a JavaScript `Error` (for promise rejections).
pub(crate) fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

/// Options parsed from the JSON the wrapper sends; a bad field is an error naming it.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> Result<T, JsValue> {
    serde_json::from_str(json).map_err(|e| js_err(format!("bad {what} options: {e}")))
}

/// A WebGPU adapter and device with the engine's per-device state.
#[wasm_bindgen]
pub struct Device {
    pub(crate) gpu: Arc<Gpu>,
}

/// Requests an adapter and a device (the engine picks the limits and optional features).
/// `software`: the adapter is a software one (SwiftShader, which the browser's adapter info
/// reveals and wgpu's does not), so the barrier-free kernel variants are used; `None` leaves
/// the choice to the engine.
#[wasm_bindgen(js_name = createDevice)]
pub async fn create_device(software: Option<bool>) -> Result<Device, JsError> {
    let gpu = Gpu::new(GpuOptions {
        software,
        ..Default::default()
    })
    .await
    .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(Device { gpu })
}

#[wasm_bindgen]
impl Device {
    /// The adapter, its optional features and the limits the engine uses, as JSON.
    pub fn info(&self) -> String {
        let g = &self.gpu;
        json!({
            "name": g.info.name,
            "vendor": g.info.vendor,
            "device": g.info.device,
            "driver": g.info.driver,
            "driverInfo": g.info.driver_info,
            "backend": format!("{:?}", g.info.backend),
            "deviceType": format!("{:?}", g.info.device_type),
            "features": {
                "shaderF16": g.features.shader_f16,
                "subgroups": g.features.subgroups,
                "timestamps": g.features.timestamps,
                "softwareKernels": g.features.software,
            },
            "limits": {
                "maxStorageBufferBindingSize": g.limits.max_storage_buffer_binding_size,
                "maxBufferSize": g.limits.max_buffer_size,
                "maxComputeWorkgroupStorageSize": g.limits.max_compute_workgroup_storage_size,
                "maxComputeInvocationsPerWorkgroup": g.limits.max_compute_invocations_per_workgroup,
                "maxStorageBuffersPerShaderStage": g.limits.max_storage_buffers_per_shader_stage,
            },
            "bindingLimit": g.binding_limit,
            "description": g.describe(),
        })
        .to_string()
    }

    /// Destroys the GPU device, as a driver reset or a crash of the browser's GPU process would
    /// lose it: work in progress ends with an error; a new device works.
    #[wasm_bindgen(js_name = loseDevice)]
    pub fn lose_device(&self) {
        self.gpu.device.destroy();
    }

    /// The engine's counters (dispatches, submits, readback bytes, objects created), as JSON.
    pub fn counters(&self) -> String {
        let c = self.gpu.counters();
        json!({
            "dispatches": c.dispatches,
            "submits": c.submits,
            "bytesUploaded": c.bytes_uploaded,
            "bytesReadBack": c.bytes_read_back,
            "buffersCreated": c.buffers_created,
            "bindGroupsCreated": c.bind_groups_created,
            "pipelinesCreated": c.pipelines_created,
        })
        .to_string()
    }
}

/// A model's files by name relative to its folder (`config.json`, `unet/config.json`, one
/// `x.gguf`, ...), copied into the module's memory as JavaScript adds them.
#[wasm_bindgen]
#[derive(Default)]
pub struct Files {
    pub(crate) map: ModelFiles,
}

#[wasm_bindgen]
impl Files {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Files {
        Files::default()
    }

    /// Adds (or replaces) one file.
    pub fn add(&mut self, name: String, bytes: Vec<u8>) {
        self.map.insert(name, bytes);
    }

    /// Number of files.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> usize {
        self.map.len()
    }
}
