"""The job functions RQ runs, by the dotted names in jobstore.contract.JOB_FUNCTIONS.

Each one: takes its lease (the heartbeat while it runs), moves the job queued -> started (or does
nothing when it was canceled meanwhile), runs, and ends the record in exactly one terminal status
with a readable reason. Failures are recorded, not raised: the worker keeps serving.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from jobstore.adapters import get_adapter, register_adapter
from jobstore.contract import (
    CONTENT_TYPES,
    JOB_ID_RE,
    MAX_INPUT_IMAGE_PIXELS,
    NO_BASE_ADAPTER,
    TERMINAL_STATUSES,
    AdapterImportPayload,
    FinetunePayload,
    GeneratePayload,
    InputImage,
    JobStatus,
    adapter_object,
    dataset_prefix,
    default_preview_every,
    finetune_work_prefix,
    image_object,
)
from jobstore.jobs import JobNotFound
from jobstore.metrics import PEAK_MEMORY_KEYS, observe_peak_memory, observe_stage
from jobstore.storage import ObjectNotFound, StorageUnavailable
from jobstore.usage import charge, charge_job_images
from worker.runtime import Runtime, runtime

log = logging.getLogger("urae.worker")
PayloadT = TypeVar("PayloadT", bound=BaseModel)


class JobCanceled(Exception):
    """The client canceled the job (raised where the library has no cancel exception of its own)."""


class StoreWaitEnded(Exception):
    """A finished result waiting for the object store stops waiting: the client canceled the job, or
    the worker is shutting down (``shutdown``: the job goes back to the queue)."""

    def __init__(self, shutdown: bool):
        super().__init__("the worker shut down" if shutdown else "canceled by request")
        self.shutdown = shutdown


# While the object store is unavailable a finished result is kept on local disk and stored again after
# these waits (doubling), for up to the job's retention (URAE_RESULT_TTL_S).
STORE_RETRY_FIRST_S = 1.0
STORE_RETRY_MAX_S = 30.0


def store_when_back(rt: Runtime, job_id: str, key: str, path: Any, what: str,
                    progress: dict[str, Any] | None = None) -> None:
    """Store a finished result (``path`` -> ``key``). While the object store is unavailable the local
    file is kept and the upload tried again with backoff, up to the job's retention, so an outage
    shorter than that loses nothing computed; meanwhile the job stays started (its progress, when
    given, says it waits) and the worker takes no new job. StoreWaitEnded on cancel or shutdown."""
    deadline = time.monotonic() + rt.settings.result_ttl_s
    delay = STORE_RETRY_FIRST_S
    waiting = False
    try:
        while True:
            try:
                rt.storage.put_file(key, path)
                if waiting:
                    log.info("job %s: the object store is back; %s stored", job_id, what)
                return
            except StorageUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{what}: the object store stayed unavailable for the job's retention "
                        f"({rt.settings.result_ttl_s} s): {exc}") from exc
                if not waiting:
                    waiting = True
                    rt.image_writer.stalled = True
                    log.warning("job %s: the object store is unavailable (%s); keeping %s and trying again",
                                job_id, exc, what)
                    if progress is not None:
                        _publish_quietly(rt, job_id, progress)
                _wait_unless_stopped(rt, job_id, delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
    finally:
        if waiting:
            rt.image_writer.stalled = False


def _publish_quietly(rt: Runtime, job_id: str, progress: dict[str, Any]) -> None:
    try:
        rt.records.set_progress(job_id, progress)
    except redis.RedisError:
        pass  # progress is informative; the result is what matters


def _wait_unless_stopped(rt: Runtime, job_id: str, seconds: float) -> None:
    """Sleep, looking at the shutdown deadline and the job's cancel flag while doing so."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if rt.shutdown_overdue():
            raise StoreWaitEnded(shutdown=True)
        try:
            if rt.records.cancel_requested(job_id):
                raise StoreWaitEnded(shutdown=False)
        except redis.RedisError:
            pass
        time.sleep(min(0.5, left))


@contextmanager
def _running(rt: Runtime, job_id: str, lease: ExitStack | None = None) -> Iterator[dict[str, Any] | None]:
    """Lease + start; yields the started record, or None when the job must not run (canceled or
    already taken). A job over its time limit ends failed with that reason. With ``lease`` the lease
    is entered into that stack and lasts until the caller closes it (a job that hands its last
    stage to another thread)."""
    settings = rt.settings
    with ExitStack() as local:
        (lease or local).enter_context(rt.records.lease(job_id, settings.lease_ttl_s, settings.heartbeat_interval_s))
        current = get_current_job()  # None when called outside an RQ worker
        record = rt.records.start(job_id, rt.name, rq_id=current.id if current is not None else None)
        if record is None:
            yield None
            return
        rt.current_job = job_id
        try:
            yield record
        except JobTimeoutException:
            rt.records.fail(job_id, f"timed out after {record.get('timeout_s', '?')} s")
        finally:
            rt.current_job = None


def _parse(rt: Runtime, model: type[PayloadT], payload: dict[str, Any]) -> PayloadT | None:
    """The validated payload; a malformed one fails its job (when it names one) instead of leaving it queued."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
            rt.records.fail(job_id, f"malformed job payload: {exc.errors()[0]['msg']}")
        log.error("malformed job payload: %s", exc)
        return None


def _should_stop(rt: Runtime, job_id: str) -> Callable[[], bool]:
    def check() -> bool:
        if rt.shutdown_overdue():
            return True
        try:
            return rt.records.cancel_requested(job_id)
        except JobTimeoutException:
            raise  # RQ's alarm can land inside this call: the job must still time out
        except Exception:  # Redis blip: keep going, the next step asks again
            return False

    return check


def _fail_unexpected(rt: Runtime, job_id: str, exc: BaseException, timings: dict[str, float] | None = None) -> None:
    log.exception("job %s failed", job_id)
    rt.records.fail(job_id, f"internal error: {type(exc).__name__}: {exc}", timings)


def _resident_generator(rt: Runtime, job_id: str) -> Any:
    """The worker's loaded model; None (and the job failed) on a worker started without one."""
    if rt.generator is None:
        rt.records.fail(job_id, "this job reached a worker without a model (start it with --queues generate)")
    return rt.generator


def run_generate(payload: dict[str, Any]) -> str:
    """Generate images for a job and hand them to the image writer, which stores them and finishes the job."""
    rt = runtime()
    job = _parse(rt, GeneratePayload, payload)
    if job is None:
        return JobStatus.FAILED
    lease = ExitStack()
    handed_off = False
    try:
        generator = _resident_generator(rt, job.job_id)
        if generator is None:
            return JobStatus.FAILED
        with _running(rt, job.job_id, lease) as record:
            if record is None:
                return "skipped"
            status = _generate(rt, job, generator, record, lease)
            handed_off = status == JobStatus.STARTED
            return status
    finally:
        if not handed_off:
            lease.close()
            _release_input(rt, job)


def _release_input(rt: Runtime, job: GeneratePayload) -> None:
    """Delete the job's uploaded input image once the job has ended (finished, failed or canceled); a
    job put back in its queue keeps it. What this misses, the API's retention sweep removes."""
    if job.image is None or job.image.key is None:
        return
    try:
        status = rt.records.status(job.job_id)
    except redis.RedisError:
        return
    if status is None or status in TERMINAL_STATUSES:
        _discard(rt, job.image.key)


def _input_image(rt: Runtime, source: InputImage) -> Any:
    """The job's input image, decoded within MAX_INPUT_IMAGE_PIXELS; InvalidSpecError (field ``image``)
    when it is gone or unreadable."""
    from urae.errors import InvalidSpecError

    if source.key is not None:
        key, what = source.key, "the uploaded input image"
    else:
        what = f"image {source.index} of job {source.job}"
        try:
            record = rt.records.get(str(source.job))
        except JobNotFound:
            raise InvalidSpecError("image", f"{what} is gone: the job's record has expired") from None
        images = (record.get("result") or {}).get("images", [])
        if record.get("status") != JobStatus.FINISHED or source.index >= len(images):
            raise InvalidSpecError("image", f"{what} is gone: that job has no such image now")
        key = images[source.index]["key"]
    try:
        path = rt.storage.local_file(key)
    except ObjectNotFound:
        raise InvalidSpecError("image", f"{what} is no longer stored") from None
    try:
        return decode_bounded(path, what)
    finally:
        if source.job is not None:
            rt.storage.evict(key)  # another job's image: this worker's copy is not kept


def decode_bounded(path: Any, what: str) -> Any:
    """Decode an image file to RGB, after checking from its header that it declares at most
    MAX_INPUT_IMAGE_PIXELS (Pillow never decodes a bomb)."""
    import warnings

    from PIL import Image, ImageOps

    from urae.errors import InvalidSpecError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=["PNG", "JPEG", "WEBP"]) as image:
                width, height = image.size
                if width * height > MAX_INPUT_IMAGE_PIXELS:
                    raise InvalidSpecError(
                        "image", f"{what} declares {width}x{height} pixels, more than {MAX_INPUT_IMAGE_PIXELS:,}")
                # A photo's EXIF orientation says which way is up; the model sees it upright.
                return ImageOps.exif_transpose(image).convert("RGB")
        except InvalidSpecError:
            raise
        except Image.DecompressionBombError:
            raise InvalidSpecError("image", f"{what} declares more than {MAX_INPUT_IMAGE_PIXELS:,} pixels") from None
        # A decoder reading damaged bytes can fail in many ways; each one means the same thing here.
        except Exception:  # noqa: BLE001
            raise InvalidSpecError("image", f"{what} is not a readable PNG, JPEG or WebP image") from None


def _generate(rt: Runtime, job: GeneratePayload, generator: Any, record: dict[str, Any], lease: ExitStack) -> str:
    """Denoise and decode; on success the images go to the writer thread (returns ``started``: the job
    finishes there, once its files are written)."""
    from urae.errors import GenerationCanceled, UraeError
    from urae.presets import resolve_spec
    from urae.spec import AdapterRef

    timings = dict(record["timings"])
    # The job runs with the adapter files it was submitted with, or not at all.
    rt.pinned_versions = dict(job.adapter_versions)
    try:
        spec = resolve_spec(
            job.prompt, job.preset, schnell=generator.schnell, aspect_ratio=job.aspect_ratio,
            adapters=tuple(AdapterRef(a.name, a.weight) for a in job.adapters),
            width=job.width, height=job.height, steps=job.steps, guidance=job.guidance,
            seed=job.seed, num_images=job.num_images, tier=job.tier, model=generator.model_id,
            strength=job.strength,
        )
        image = _input_image(rt, job.image) if job.image is not None else None

        def on_progress(p: Any) -> None:
            try:
                rt.records.set_progress(job.job_id, {"stage": p.stage, "step": p.step, "total": p.total})
            except JobTimeoutException:
                raise
            except Exception:
                log.warning("job %s: progress not published", job.job_id)

        # Image to image runs the schedule's tail only: previews are spread over the steps run.
        preview_every = (default_preview_every(rt.settings.preview_every, spec.steps_run())
                         if job.preview_every is None else job.preview_every)
        result = generator.generate(spec, on_progress=on_progress, should_cancel=_should_stop(rt, job.job_id),
                                    on_preview=_preview_publisher(rt, job.job_id), preview_every=preview_every,
                                    image=image)
        timings.update({k: round(v, 4) for k, v in result.timings.items()})
        # The next job denoises while these images are encoded and stored; this job is reported
        # finished (and its lease released) only once every file is durably written.
        rt.image_writer.submit(partial(_write_and_finish, rt, job, record, spec, result, timings, lease))
        return JobStatus.STARTED
    except GenerationCanceled as exc:
        if rt.shutdown_overdue():
            rt.records.requeue(job.job_id, "the worker shut down; the job runs again later")
            return JobStatus.QUEUED
        rt.records.cancel_done(job.job_id, f"canceled by request ({exc})", timings)
        return JobStatus.CANCELED
    except UraeError as exc:
        rt.records.fail(job.job_id, str(exc), timings)
        return JobStatus.FAILED
    except JobTimeoutException:
        raise
    except StorageUnavailable as exc:
        rt.records.fail(job.job_id, str(exc), timings)
        return JobStatus.FAILED
    except Exception as exc:
        _fail_unexpected(rt, job.job_id, exc, timings)
        return JobStatus.FAILED
    finally:
        rt.pinned_versions = {}


def _write_and_finish(
    rt: Runtime, job: GeneratePayload, record: dict[str, Any], spec: Any, result: Any, timings: dict[str, float],
    lease: ExitStack,
) -> None:
    """(Writer thread) encode and store every image atomically, then finish the job and end its lease.
    Any failure fails the job and leaves none of its images behind."""
    from urae.errors import OutputWriteError, UraeError
    from urae.output import save_image

    written: list[str] = []
    written_bytes = 0
    with lease:
        try:
            timings["write_started_at"] = round(time.time(), 4)
            t0 = time.perf_counter()
            images = []
            for index, (image, metadata) in enumerate(zip(result.images, result.metadata, strict=True)):
                key = image_object(job.job_id, index, job.output_format)
                try:
                    tmp = rt.storage.temp_path(key)
                    try:
                        save_image(image, {**metadata, "job_id": job.job_id}, tmp, job.output_format,
                                   png_compress_level=rt.settings.png_compress_level)
                        written_bytes += tmp.stat().st_size
                        store_when_back(rt, job.job_id, key, tmp, f"image {index}",
                                        {"stage": "store", "step": index, "total": len(result.images)})
                    finally:
                        tmp.unlink(missing_ok=True)
                except OSError as exc:
                    raise OutputWriteError(f"cannot write image {index}: {exc.strerror or exc}") from exc
                written.append(key)
                images.append({
                    "index": index, "key": key, "url": f"/jobs/{job.job_id}/images/{index}",
                    "width": image.width, "height": image.height, "seed": metadata["seed"],
                    "seed_str": str(metadata["seed"]), "content_type": CONTENT_TYPES[job.output_format],
                })
            timings["write"] = round(time.perf_counter() - t0, 4)
            timings["write_ended_at"] = round(time.time(), 4)
            # seed_str: the seed as text too, for JSON clients whose numbers are doubles (JavaScript holds
            # integers exactly only up to 2^53; seeds go to 2^63 - 1).
            summary = {"images": images, "seed": job.seed, "seed_str": str(job.seed), "preset": spec.preset, "width": spec.width,
                       "height": spec.height, "steps": spec.steps, "adapters": result.metadata[0]["adapters"],
                       "tier": spec.tier, "attention_backend": result.metadata[0].get("attention_backend"),
                       "warnings": result.warnings, "strength": spec.strength}
            if job.image is not None:
                source = {"job": job.image.job, "index": job.image.index} if job.image.job else {"upload": True}
                summary["steps_run"] = spec.steps_run()
                summary["input_image"] = {**source, **result.metadata[0].get("input_image", {})}
            # Charged before the job is reported finished (a client that sees it finished sees the bytes
            # counted); retention gives them back with the images.
            charge_job_images(rt.conn, job.job_id, record.get("owner", ""), written_bytes)
            if rt.records.finish(job.job_id, summary, timings):
                for stage in ("text_encode", "denoise", "decode", "write"):
                    if stage in timings:
                        observe_stage(rt.conn, stage, timings[stage])
                for name in PEAK_MEMORY_KEYS:
                    if name in timings:
                        observe_peak_memory(rt.conn, name, timings[name])
        except StoreWaitEnded as exc:
            _remove(rt, written)
            if exc.shutdown:
                rt.records.requeue(job.job_id, "the worker shut down while the object store was unavailable; "
                                               "the job runs again later")
            else:
                rt.records.cancel_done(job.job_id, "canceled by request while its images waited for the object store",
                                       timings)
        except (UraeError, StorageUnavailable) as exc:
            _remove(rt, written)
            rt.records.fail(job.job_id, str(exc), timings)
        except Exception as exc:
            _remove(rt, written)
            _fail_unexpected(rt, job.job_id, exc, timings)
    _release_input(rt, job)


def _preview_publisher(rt: Runtime, job_id: str) -> Callable[[Any], None]:
    """Encodes a preview frame as a JPEG data URL and publishes it (runs in the preview thread)."""
    from PIL import Image

    def publish(frame: Any) -> None:
        buffer = io.BytesIO()
        Image.fromarray(frame.pixels).save(buffer, "JPEG", quality=rt.settings.preview_jpeg_quality)
        height, width = frame.pixels.shape[:2]
        rt.records.set_preview(job_id, {
            "step": frame.step, "total": frame.total, "index": frame.index, "width": width, "height": height,
            "image": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        })

    return publish


def _remove(rt: Runtime, keys: list[str]) -> None:
    # No partial result: a failed job leaves none of its images behind.
    for key in keys:
        _discard(rt, key)


def _discard(rt: Runtime, key: str) -> None:
    """Delete an object the job no longer needs; with the store down, retention removes it later."""
    rt.storage.evict(key)
    try:
        rt.storage.delete(key)
    except StorageUnavailable:
        log.warning("could not delete %s: the object store is unavailable", key)


def run_adapter_import(payload: dict[str, Any]) -> str:
    """Validate an uploaded adapter against the resident model, convert it, register it."""
    from urae.errors import UraeError

    rt = runtime()
    job = _parse(rt, AdapterImportPayload, payload)
    if job is None:
        return JobStatus.FAILED
    generator = _resident_generator(rt, job.job_id)
    if generator is None:
        return JobStatus.FAILED
    with _running(rt, job.job_id) as record:
        if record is None:
            return "skipped"
        src: Any = job.upload
        try:
            src = rt.storage.local_file(job.upload)
            adapter = register_file(rt, job.name, src, generator.pipe.transformer,
                                    job.base_adapter, job.description, job.source, record.get("owner", ""),
                                    job.replaces)
            rt.records.finish(job.job_id, {"adapter": adapter}, {})
            return JobStatus.FINISHED
        except UraeError as exc:
            # Clients see the problem, not the server's file layout.
            rt.records.fail(job.job_id, str(exc).replace(f"{src}: ", "").replace(str(src), "the uploaded file"))
            return JobStatus.FAILED
        except JobTimeoutException:
            raise
        except StoreWaitEnded as exc:
            return _stopped_waiting(rt, job.job_id, exc)
        except (StorageUnavailable, ObjectNotFound) as exc:
            rt.records.fail(job.job_id, str(exc))
            return JobStatus.FAILED
        except Exception as exc:
            _fail_unexpected(rt, job.job_id, exc)
            return JobStatus.FAILED
        finally:
            _discard(rt, job.upload)


def register_file(
    rt: Runtime, name: str, src: Any, transformer: Any, base_adapter: str | None, description: str, source: str,
    owner: str = "", replaces: str | None = None,
) -> dict[str, Any]:
    """Convert ``src`` into the served form under a new version of ``name`` and register it for
    ``owner`` (the key that uploaded or trained it), charging its bytes to that key.

    ``replaces`` is what the name held when the job was accepted ("" or a version): when another
    upload or fine-tune registered the name since (a fine-tune can run for hours), nothing changes
    and the job fails, so no key ever overwrites another's adapter."""
    from urae.adapters import prepare_for_serving
    from urae.adapters.manager import uncovered_layers
    from urae.errors import AdapterError, AdapterLoadError, HotswapRankError

    version = uuid.uuid4().hex[:12]
    key = adapter_object(name, version)
    tmp = rt.storage.temp_path(key)
    try:
        # NO_BASE_ADAPTER: a minor-component file split from the plain base (the API made the caller say so).
        base_lora = rt.resolve_adapter(base_adapter) if base_adapter not in (None, NO_BASE_ADAPTER) else None
        info = prepare_for_serving(src, tmp, transformer, base_lora=base_lora)
        limit = rt.settings.hotswap_rank
        if limit is not None and info.rank > limit:
            raise HotswapRankError(
                f"adapter {name!r} has rank {info.rank} after conversion; the workers hot-swap adapters up to "
                f"rank {limit} (URAE_HOTSWAP_RANK)"
            )
        outside = uncovered_layers(info.targets)
        if outside:
            raise AdapterLoadError(
                f"adapter {name!r} changes {len(outside)} layer(s) outside the attention projections the workers' "
                f"adapter slots serve (first: {outside[0]})"
            )
        store_when_back(rt, rt.current_job or name, key, tmp, f"adapter {name!r}")
    finally:
        tmp.unlink(missing_ok=True)
    previous = get_adapter(rt.conn, name)
    if replaces is not None and (previous.get("version", "") if previous else "") != replaces:
        rt.storage.delete(key)
        raise AdapterError(
            f"adapter {name!r} was registered or replaced by another upload or fine-tune while this job ran; "
            "nothing was changed (submit again to replace it)"
        )
    if previous is not None and replaces:
        owner = previous.get("owner", owner)  # an admin replacing a key's adapter leaves it that key's
    adapter = {
        # rank: what the adapter was trained at; export_rank: the served plain LoRA's (2r + the base's
        # for a minor-component adapter).
        "name": name, "version": version, "object": key, "rank": info.trained_rank, "export_rank": info.rank,
        "size_bytes": rt.storage.stat(key).size, "source": source, "description": description,
        "created_at": time.time(), "sha256": info.sha256, "base_model": rt.settings.model, "owner": owner,
    }
    register_adapter(rt.conn, adapter)
    charge(rt.conn, owner, int(adapter["size_bytes"]))
    if previous is not None and previous.get("object") != key:
        rt.storage.delete(previous["object"])
        charge(rt.conn, previous.get("owner", ""), -int(previous.get("size_bytes", 0)))
    return adapter


def run_finetune(payload: dict[str, Any]) -> str:
    """Train an adapter on a stored dataset and register it (runs in its own process)."""
    from urae.errors import TrainingCanceled, UraeError
    from urae.train import TrainConfig, train

    rt = runtime()
    job = _parse(rt, FinetunePayload, payload)
    if job is None:
        return JobStatus.FAILED
    # The parent worker signals an overdue shutdown with SIGUSR1 (this job runs in a forked child).
    signal.signal(signal.SIGUSR1, lambda *_: setattr(rt, "shutdown_deadline", time.monotonic()))
    with _running(rt, job.job_id) as record:
        if record is None:
            return "skipped"
        work = rt.settings.local_cache_dir / finetune_work_prefix(job.job_id)
        keep_work = False
        try:
            _restore_checkpoints(rt, job.job_id, work)
            overrides = dict(job.recipe)
            recipe_name = overrides.pop("recipe", None)
            data = {**(_shipped_recipe(str(recipe_name)) if recipe_name else {}), **overrides}
            if data.get("base_adapter"):
                data["base_adapter"] = str(rt.resolve_adapter(str(data["base_adapter"])))
            config = TrainConfig.from_dict({
                **data,
                "model_id": rt.settings.model,
                "dataset_dir": str(_local_dataset(rt, job.dataset)),
                "output_dir": str(work),
                "device": "cpu" if rt.settings.device == "cpu" else "auto",
                # A job put back after a shutdown continues from its last checkpoint.
                "resume": True,
                "progress_bar": False,
            })
            started = time.monotonic()

            def on_progress(p: Any) -> None:
                progress = {"stage": p.stage, "step": p.step, "total": p.total,
                            "loss": None if p.loss != p.loss else round(float(p.loss), 6),  # NaN while caching
                            "eta_s": round(float(p.eta_s), 2)}
                try:
                    rt.records.set_progress(job.job_id, progress)
                except JobTimeoutException:
                    raise
                except Exception:
                    log.warning("job %s: progress not published", job.job_id)

            result = train(config, on_progress=on_progress, should_cancel=_should_stop(rt, job.job_id))
            timings = {"train": round(time.monotonic() - started, 3)}
            # The trainer exports a plain LoRA on the original weights: validated here, no model needed.
            adapter = register_file(rt, job.adapter_name, result.adapter_path, None, None,
                                    f"fine-tuned on dataset {job.dataset}", "finetune", record.get("owner", ""),
                                    job.replaces)
            final_loss = None if result.final_loss != result.final_loss else float(result.final_loss)
            rt.records.finish(job.job_id, {"adapter": adapter, "steps": result.steps, "final_loss": final_loss},
                              timings)
            return JobStatus.FINISHED
        except TrainingCanceled as exc:
            if rt.shutdown_overdue():
                keep_work = True
                _store_checkpoints(rt, job.job_id, work)
                rt.records.requeue(job.job_id, "the worker shut down; training resumes from its checkpoint later")
                return JobStatus.QUEUED
            rt.records.cancel_done(job.job_id, f"canceled by request ({exc})")
            return JobStatus.CANCELED
        except StoreWaitEnded as exc:
            keep_work = exc.shutdown  # its checkpoints stay here for a resume on this host
            return _stopped_waiting(rt, job.job_id, exc)
        except (UraeError, StorageUnavailable) as exc:
            rt.records.fail(job.job_id, str(exc))
            return JobStatus.FAILED
        except JobTimeoutException:
            raise
        except Exception as exc:
            _fail_unexpected(rt, job.job_id, exc)
            return JobStatus.FAILED
        finally:
            if not keep_work:
                shutil.rmtree(work, ignore_errors=True)
                _discard(rt, finetune_work_prefix(job.job_id))


def _stopped_waiting(rt: Runtime, job_id: str, exc: StoreWaitEnded) -> str:
    """A result that waited for the object store is given up: back to the queue on shutdown, else canceled."""
    if exc.shutdown:
        rt.records.requeue(job_id, "the worker shut down while the object store was unavailable; the job runs again later")
        return JobStatus.QUEUED
    rt.records.cancel_done(job_id, "canceled by request while its result waited for the object store")
    return JobStatus.CANCELED


def _store_checkpoints(rt: Runtime, job_id: str, work: Any) -> None:
    """Store a training job's checkpoints, so that the worker that takes it next, on any host, resumes
    from the last one. Without the store the job still goes back (it then starts over elsewhere)."""
    from urae.train.checkpoints import checkpoint_root

    prefix = finetune_work_prefix(job_id)
    try:
        rt.storage.delete(prefix)
        if checkpoint_root(work).is_dir():
            rt.storage.put_tree(prefix, checkpoint_root(work))
    except (OSError, ValueError) as exc:  # the store down, a damaged checkpoint folder
        log.warning("job %s: checkpoints not stored (%s); it restarts from step 0 on another host", job_id, exc)


def _restore_checkpoints(rt: Runtime, job_id: str, work: Any) -> None:
    """This host's copy of the checkpoints a shut-down worker stored for the job, if any."""
    from urae.train.checkpoints import checkpoint_root

    prefix = finetune_work_prefix(job_id)
    if checkpoint_root(work).is_dir() or not rt.storage.tree_exists(prefix):
        return
    shutil.copytree(rt.storage.local_tree(prefix), checkpoint_root(work))


def _local_dataset(rt: Runtime, name: str) -> Any:
    """The dataset's files on this host (downloaded once per content); a clear error when it is gone."""
    from urae.errors import InvalidSpecError

    try:
        return rt.storage.local_tree(dataset_prefix(name))
    except ObjectNotFound:
        raise InvalidSpecError("dataset", f"dataset {name!r} is no longer stored") from None


def _shipped_recipe(name: str) -> dict[str, Any]:
    """A recipe shipped with the library, by name only: a client never names a file on the server."""
    from urae.errors import InvalidSpecError
    from urae.train.config import load_recipe, recipe_folders

    for folder in recipe_folders():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return load_recipe(str(path))
    raise InvalidSpecError("recipe", f"{name!r} is not a shipped recipe")
