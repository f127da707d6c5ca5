//! `kiln image --window`: a desktop window (winit + softbuffer, X11) that shows the denoising
//! live — the latent preview after every step — and then the final image.

use anyhow::{anyhow, Result};
use std::num::NonZeroU32;
use std::rc::Rc;
use winit::application::ApplicationHandler;
use winit::dpi::LogicalSize;
use winit::event::WindowEvent;
use winit::event_loop::{ActiveEventLoop, EventLoop, EventLoopProxy};
use winit::window::{Window, WindowId};

/// What the generation thread sends to the window.
pub enum Frame {
    /// An RGB picture and a title.
    Picture {
        width: usize,
        height: usize,
        rgb: Vec<u8>,
        title: String,
    },
    /// Generation failed.
    Failed(String),
}

/// Sends frames to the window from any thread.
#[derive(Clone)]
pub struct Sender(EventLoopProxy<Frame>);

impl Sender {
    /// Shows a picture (ignored once the window is closed).
    pub fn show(&self, width: usize, height: usize, rgb: Vec<u8>, title: String) {
        let _ = self.0.send_event(Frame::Picture {
            width,
            height,
            rgb,
            title,
        });
    }
    /// Reports a failure.
    pub fn fail(&self, msg: String) {
        let _ = self.0.send_event(Frame::Failed(msg));
    }
}

struct App {
    window: Option<Rc<Window>>,
    surface: Option<softbuffer::Surface<Rc<Window>, Rc<Window>>>,
    picture: Option<(usize, usize, Vec<u8>)>,
    error: Option<String>,
}

impl ApplicationHandler<Frame> for App {
    fn resumed(&mut self, el: &ActiveEventLoop) {
        if self.window.is_some() {
            return;
        }
        let attrs = Window::default_attributes()
            .with_title("kiln — denoising")
            .with_inner_size(LogicalSize::new(512.0, 512.0));
        let made = el
            .create_window(attrs)
            .map_err(|e| e.to_string())
            .and_then(|w| {
                let w = Rc::new(w);
                let ctx = softbuffer::Context::new(w.clone()).map_err(|e| e.to_string())?;
                let surface =
                    softbuffer::Surface::new(&ctx, w.clone()).map_err(|e| e.to_string())?;
                Ok((w, surface))
            });
        match made {
            Ok((w, s)) => {
                self.window = Some(w);
                self.surface = Some(s);
            }
            Err(e) => {
                self.error = Some(format!("could not open a window: {e}"));
                el.exit();
            }
        }
    }

    fn user_event(&mut self, el: &ActiveEventLoop, frame: Frame) {
        match frame {
            Frame::Picture {
                width,
                height,
                rgb,
                title,
            } => {
                self.picture = Some((width, height, rgb));
                if let Some(w) = &self.window {
                    w.set_title(&title);
                    w.request_redraw();
                }
            }
            Frame::Failed(msg) => {
                self.error = Some(msg);
                el.exit();
            }
        }
    }

    fn window_event(&mut self, el: &ActiveEventLoop, _id: WindowId, event: WindowEvent) {
        match event {
            WindowEvent::CloseRequested => el.exit(),
            WindowEvent::RedrawRequested => self.draw(),
            WindowEvent::Resized(_) => {
                if let Some(w) = &self.window {
                    w.request_redraw();
                }
            }
            _ => {}
        }
    }
}

impl App {
    /// Scales the picture to the window (nearest neighbour) and presents it.
    fn draw(&mut self) {
        let (Some(w), Some(surface)) = (&self.window, &mut self.surface) else {
            return;
        };
        let size = w.inner_size();
        let (Some(ww), Some(wh)) = (NonZeroU32::new(size.width), NonZeroU32::new(size.height))
        else {
            return;
        };
        if surface.resize(ww, wh).is_err() {
            return;
        }
        let Ok(mut buf) = surface.buffer_mut() else {
            return;
        };
        let (sw, sh) = (size.width as usize, size.height as usize);
        match &self.picture {
            Some((pw, ph, rgb)) => {
                for y in 0..sh {
                    let py = y * ph / sh;
                    for x in 0..sw {
                        let p = (py * pw + x * pw / sw) * 3;
                        buf[y * sw + x] = ((rgb[p] as u32) << 16)
                            | ((rgb[p + 1] as u32) << 8)
                            | rgb[p + 2] as u32;
                    }
                }
            }
            None => buf.fill(0x202020),
        }
        let _ = buf.present();
    }
}

/// Opens the window and runs `work` on another thread with a [`Sender`]; returns when the
/// window is closed (or the work failed).
pub fn run(work: impl FnOnce(Sender) + Send + 'static) -> Result<()> {
    let event_loop = EventLoop::<Frame>::with_user_event().build().map_err(|e| {
        anyhow!(
            "could not open a window ({e}); is a display available? (DISPLAY, or run under Xvfb)"
        )
    })?;
    let sender = Sender(event_loop.create_proxy());
    std::thread::spawn(move || work(sender));
    let mut app = App {
        window: None,
        surface: None,
        picture: None,
        error: None,
    };
    event_loop
        .run_app(&mut app)
        .map_err(|e| anyhow!("window event loop: {e}"))?;
    match app.error {
        Some(e) => Err(anyhow!(e)),
        None => Ok(()),
    }
}
