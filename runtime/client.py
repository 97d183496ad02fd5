"""Typed Python client of the UniMP Edge gRPC API.

    with UnimpClient("127.0.0.1:50051", token="...") as client:
        result = client.recommend(["sku-1", "sku-7"], top_k=5)
        for event in client.explain("sku-9", history=["sku-1"]):
            ...

Methods take and return ``runtime.types`` / ``runtime.api`` dataclasses (history items may also be
given as bare catalog ids). Failures raise ``RpcError`` carrying the status code, the message and the
offending request field. Streaming methods return generators; closing one early cancels the RPC,
which stops the server's work.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.api import CatalogItem, CatalogPage, ImageProgress, ImageResult
from runtime.server import convert
from runtime.server.errors import FIELD_METADATA_KEY
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import catalog_pb2_grpc as cpb_grpc
from runtime.server.protos import personalization_pb2 as ppb
from runtime.server.protos import personalization_pb2_grpc as ppb_grpc
from runtime.server.tls import channel_credentials
from runtime.types import (
    BeamOptions,
    DecodeMode,
    HistoryItem,
    ItemFilter,
    ItemMeta,
    PreferenceResult,
    RecommendResult,
    SamplingOptions,
    SelectResult,
    TextPiece,
)

History = Sequence[HistoryItem | str]
"""History items, oldest first; a str is a catalog id."""

IMAGE_MODELS = {"unspecified": ppb.IMAGE_MODEL_UNSPECIFIED, "vqgan": ppb.IMAGE_MODEL_VQGAN,
                "diffusion": ppb.IMAGE_MODEL_DIFFUSION}
_SCHEDULERS = {"ddim": ppb.IMAGE_SCHEDULER_DDIM, "euler": ppb.IMAGE_SCHEDULER_EULER, "pndm": ppb.IMAGE_SCHEDULER_PNDM}


class RpcError(Exception):
    """A failed RPC: gRPC status code, server message and (when the server named one) the request field."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field

    @staticmethod
    def wrap(exc: grpc.RpcError) -> RpcError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        field = None
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == FIELD_METADATA_KEY:
                field = value
        return RpcError(code, details or "", field)


@dataclass(frozen=True)
class ClientTls:
    """TLS settings of a client: CA to trust (None: system roots), optional client certificate (mTLS)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None
    """Expected server name when it differs from the target's host (e.g. connecting by IP)."""

    @staticmethod
    def from_files(
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return ClientTls(read(ca), read(cert), read(key), server_name)


@dataclass(frozen=True)
class UpsertResult:
    item: CatalogItem
    created: bool


@dataclass(frozen=True)
class FetchedItem:
    item: CatalogItem
    image: bytes = b""
    """Encoded image when requested and present."""


@dataclass(frozen=True)
class RecordedInteraction:
    interaction_id: int
    """Id for ``delete_interaction``."""
    history_length: int
    """Interactions now stored for the user."""


@dataclass(frozen=True)
class ForgottenUser:
    interactions_removed: int
    prefixes_removed: int
    """Cached prompt prefixes computed from the user's stored history."""


class UnimpClient:
    """One channel to a UniMP Edge server; thread-safe, reuse it."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: ClientTls | bool | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        """``tls``: None/False plaintext, True TLS with system roots, or ClientTls. ``timeout``: default
        deadline of each call in seconds (None: no deadline)."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is None or tls is False:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            settings = ClientTls() if tls is True else tls
            if settings.server_name:
                options.append(("grpc.ssl_target_name_override", settings.server_name))
            credentials = channel_credentials(settings.root_certificates, settings.certificate_chain,
                                              settings.private_key)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._personalization = ppb_grpc.PersonalizationStub(self._channel)
        self._catalog = cpb_grpc.CatalogStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> UnimpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RpcError.wrap(exc) from None

    def _stream(self, method: Any, request: Any, timeout: float | None) -> Generator[Any, None, None]:
        call = method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise RpcError.wrap(exc) from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when the caller stopped early

    @staticmethod
    def _history(history: History) -> list[ppb.HistoryItem]:
        return convert.history_to_proto(history)

    @staticmethod
    def _target(item: HistoryItem | str) -> ppb.HistoryItem:
        return convert.history_item_to_proto(item)

    # -- health --------------------------------------------------------------------------------------

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """Serving status name of ``service`` ("" for the whole server): SERVING, NOT_SERVING, ..."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # -- Personalization -----------------------------------------------------------------------------

    def recommend(
        self,
        history: History = (),
        *,
        user_id: str = "",
        top_k: int = 10,
        mode: DecodeMode = DecodeMode.FAST,
        filter: ItemFilter | None = None,
        beam: BeamOptions | None = None,
        timeout: float | None = None,
    ) -> RecommendResult:
        request = ppb.RecommendRequest(user_id=user_id, history=self._history(history),
                                       options=convert.decode_options_to_proto(top_k, mode, filter, beam))
        return convert.recommend_result_from_proto(self._unary(self._personalization.Recommend, request, timeout))

    def search(
        self,
        query: str,
        history: History = (),
        *,
        user_id: str = "",
        top_k: int = 10,
        mode: DecodeMode = DecodeMode.FAST,
        filter: ItemFilter | None = None,
        beam: BeamOptions | None = None,
        timeout: float | None = None,
    ) -> RecommendResult:
        request = ppb.SearchRequest(user_id=user_id, history=self._history(history), query=query,
                                    options=convert.decode_options_to_proto(top_k, mode, filter, beam))
        return convert.recommend_result_from_proto(self._unary(self._personalization.Search, request, timeout))

    def predict_preference(
        self,
        target: HistoryItem | str,
        history: History = (),
        *,
        user_id: str = "",
        sampling: SamplingOptions | None = None,
        timeout: float | None = None,
    ) -> PreferenceResult:
        request = ppb.PredictPreferenceRequest(user_id=user_id, history=self._history(history),
                                               target=self._target(target),
                                               sampling=convert.sampling_to_proto(sampling))
        response = self._unary(self._personalization.PredictPreference, request, timeout)
        return convert.prediction_from_proto(response.prediction)

    def explain(
        self,
        target: HistoryItem | str,
        history: History = (),
        *,
        user_id: str = "",
        sampling: SamplingOptions | None = None,
        timeout: float | None = None,
    ) -> Generator[TextPiece | PreferenceResult, None, None]:
        """TextPiece events as the explanation is decoded, then one PreferenceResult.

        Closing the generator early (``close()``, or leaving a ``for`` loop over the call) cancels the RPC
        and the server's work."""
        request = ppb.ExplainRequest(user_id=user_id, history=self._history(history), target=self._target(target),
                                     sampling=convert.sampling_to_proto(sampling))
        for message in self._stream(self._personalization.Explain, request, timeout):
            yield convert.explain_event_from_proto(message)

    def select_items(
        self,
        candidates: Sequence[HistoryItem | str],
        history: History = (),
        *,
        user_id: str = "",
        max_selected: int = 0,
        timeout: float | None = None,
    ) -> SelectResult:
        request = ppb.SelectItemsRequest(user_id=user_id, history=self._history(history),
                                         candidates=self._history(candidates), max_selected=max_selected)
        return convert.select_result_from_proto(self._unary(self._personalization.SelectItems, request, timeout))

    def generate_image(
        self,
        query: str,
        history: History = (),
        *,
        user_id: str = "",
        negative_prompt: str = "",
        steps: int = 0,
        guidance_scale: float | None = None,
        width: int = 0,
        height: int = 0,
        seed: int = 0,
        scheduler: str = "ddim",
        timeout: float | None = None,
        image_model: str = "unspecified",
        temperature: float = 0.0,
        top_p: float | None = None,
    ) -> Generator[ImageProgress | ImageResult, None, None]:
        """ImageProgress per denoising step (diffusion) or code row (VQGAN), then one ImageResult (PNG,
        the prompt used, and for VQGAN the 256 codes).

        ``image_model``: "unspecified" (VQGAN when the server has it, else diffusion), "vqgan" or
        "diffusion". ``temperature`` / ``top_p`` sample the VQGAN codes (0: greedy, the paper's setting).

        Closing the generator early (``close()``, or leaving a ``for`` loop over the call) cancels the RPC
        and the server's work."""
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(_SCHEDULERS)}, got {scheduler!r}")
        if image_model not in IMAGE_MODELS:
            raise ValueError(f"image_model must be one of {', '.join(IMAGE_MODELS)}, got {image_model!r}")
        request = ppb.GenerateImageRequest(user_id=user_id, history=self._history(history), query=query,
                                           negative_prompt=negative_prompt, steps=steps, width=width, height=height,
                                           seed=seed, scheduler=_SCHEDULERS[scheduler],
                                           image_model=IMAGE_MODELS[image_model], temperature=temperature)
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        if top_p is not None:
            request.top_p = top_p
        for message in self._stream(self._personalization.GenerateImage, request, timeout):
            yield convert.image_event_from_proto(message)

    def record_interaction(
        self, user_id: str, item: HistoryItem | str, occurred_at_ms: int = 0, timeout: float | None = None
    ) -> RecordedInteraction:
        """Append an interaction to the user's stored history; returns its id and the number stored."""
        request = ppb.RecordInteractionRequest(user_id=user_id, item=self._target(item),
                                               occurred_at_unix_ms=occurred_at_ms)
        reply = self._unary(self._personalization.RecordInteraction, request, timeout)
        return RecordedInteraction(int(reply.interaction_id), int(reply.history_length))

    def delete_interaction(self, user_id: str, interaction_id: int, timeout: float | None = None) -> int:
        """Remove one stored interaction (NOT_FOUND if the user has none with that id); returns the number left."""
        request = ppb.DeleteInteractionRequest(user_id=user_id, interaction_id=interaction_id)
        return int(self._unary(self._personalization.DeleteInteraction, request, timeout).history_length)

    def forget_user(self, user_id: str, timeout: float | None = None) -> ForgottenUser:
        """Remove every stored interaction of the user (in the caller's tenant) and its cached prefixes."""
        reply = self._unary(self._personalization.ForgetUser, ppb.ForgetUserRequest(user_id=user_id), timeout)
        return ForgottenUser(int(reply.interactions_removed), int(reply.prefixes_removed))

    # -- Catalog -------------------------------------------------------------------------------------

    def upsert_item(
        self,
        item_id: str,
        meta: ItemMeta | None = None,
        image: bytes | None = None,
        available: bool | None = None,
        timeout: float | None = None,
    ) -> UpsertResult:
        """Create or update an item (admin token); None arguments keep the current values."""
        request = cpb.UpsertItemRequest(item_id=item_id, image=image or b"")
        attributes = convert.attributes_to_proto(meta)
        if attributes is not None:
            request.attributes.CopyFrom(attributes)
        if available is not None:
            request.available = available
        response = self._unary(self._catalog.UpsertItem, request, timeout)
        return UpsertResult(convert.catalog_item_from_proto(response.item), response.created)

    def get_item(self, item_id: str, include_image: bool = False, timeout: float | None = None) -> FetchedItem:
        response = self._unary(self._catalog.GetItem, cpb.GetItemRequest(item_id=item_id, include_image=include_image),
                               timeout)
        return FetchedItem(convert.catalog_item_from_proto(response.item), response.image)

    def list_items(self, page_size: int = 0, page_token: str = "", timeout: float | None = None) -> CatalogPage:
        response = self._unary(self._catalog.ListItems, cpb.ListItemsRequest(page_size=page_size,
                                                                             page_token=page_token), timeout)
        return convert.catalog_page_from_proto(response)

    def iter_items(self, page_size: int = 100) -> Iterator[CatalogItem]:
        """Every catalog item, fetching page after page."""
        token = ""
        while True:
            page = self.list_items(page_size, token)
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def delete_item(self, item_id: str, timeout: float | None = None) -> None:
        self._unary(self._catalog.DeleteItem, cpb.DeleteItemRequest(item_id=item_id), timeout)


def history_items(ids: Iterable[str]) -> tuple[HistoryItem, ...]:
    """Catalog ids as HistoryItems."""
    return tuple(HistoryItem(item_id=i) for i in ids)
