//! Compression only for the requests that ask for it. tower-http's layers wrap every request
//! and response body (the request decompressor also boxes each response), which cost the small
//! requests that never compress about a fifth of `/v2/health/live`'s throughput at 64
//! connections (`scripts/bench_floor.py`). A request with a `Content-Encoding` (a compressed
//! body) or an `Accept-Encoding` (a client that takes compressed answers) goes through them;
//! every other request goes straight to the routes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use futures_util::future::Either;
use tower::util::MapRequest;
use tower::{Layer, Service, ServiceExt};
use tower_http::CompressionLevel;
use tower_http::compression::{Compression, CompressionLayer};
use tower_http::decompression::{DecompressionBody, RequestDecompression, RequestDecompressionLayer};

/// Wraps routes in [`Coding`].
#[derive(Clone, Copy)]
pub struct CodingLayer;

impl<S: Clone> Layer<S> for CodingLayer {
    type Service = Coding<S>;

    fn layer(&self, inner: S) -> Coding<S> {
        let decoded: Decoded<S> =
            MapRequest::new(inner.clone(), |r: Request<DecompressionBody<Body>>| r.map(Body::new));
        let coded = CompressionLayer::new()
            .quality(CompressionLevel::Fastest)
            .layer(RequestDecompressionLayer::new().layer(decoded));
        Coding { plain: inner, coded }
    }
}

type Decoded<S> = MapRequest<S, fn(Request<DecompressionBody<Body>>) -> Request>;

/// The routes, and the same routes behind request decompression and response compression.
#[derive(Clone)]
pub struct Coding<S> {
    plain: S,
    coded: Compression<RequestDecompression<Decoded<S>>>,
}

type Coded = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for Coding<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Coded>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let headers = req.headers();
        if !headers.contains_key(header::CONTENT_ENCODING) && !headers.contains_key(header::ACCEPT_ENCODING) {
            return Either::Left(self.plain.call(req));
        }
        // Routes are always ready (axum's own middleware calls a clone the same way).
        let coded = self.coded.clone().oneshot(req);
        Either::Right(Box::pin(async move { coded.await.map(|r| r.map(Body::new)) }))
    }
}
