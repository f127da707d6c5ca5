//! Panics become JavaScript errors with the panic's message.
//!
//! On wasm32 a panic aborts: the module traps with an opaque `RuntimeError: unreachable`, and
//! a panic inside a future leaves its promise pending forever. The hook below hands the message
//! to a JavaScript function (set by `js/kiln.js`) before the trap, which rejects every pending
//! call with an `Error` that carries the message and marks the module as unusable.

use std::cell::RefCell;
use wasm_bindgen::prelude::*;

thread_local! {
    static HANDLER: RefCell<Option<js_sys::Function>> = const { RefCell::new(None) };
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(msg: &str);
}

#[wasm_bindgen(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string();
        console_error(&format!("kiln: Rust panic: {msg}"));
        HANDLER.with(|h| {
            if let Some(f) = h.borrow().as_ref() {
                let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&msg));
            }
        });
    }));
}

/// Sets the function that receives the message of a panic (just before the module traps).
#[wasm_bindgen(js_name = setPanicHandler)]
pub fn set_panic_handler(f: js_sys::Function) {
    HANDLER.with(|h| *h.borrow_mut() = Some(f));
}

/// Panics on purpose, synchronously or inside a future (tests check that the message reaches
/// JavaScript as an `Error`).
#[wasm_bindgen(js_name = debugPanic)]
pub fn debug_panic(in_future: bool) -> js_sys::Promise {
    if !in_future {
        panic!("debugPanic: a deliberate panic");
    }
    wasm_bindgen_futures::future_to_promise(async {
        let resolved =
            wasm_bindgen_futures::JsFuture::from(js_sys::Promise::resolve(&JsValue::NULL));
        let _ = resolved.await;
        panic!("debugPanic: a deliberate panic in a future");
    })
}
