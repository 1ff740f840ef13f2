"""ImageLibraryService: thin proto <-> domain mapping around LibraryService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.library import ImageKind, ImageQuery, MetadataUpdate
from imagegen.services.library import LibraryService
from imagegen.v1 import library_pb2, library_pb2_grpc

_KINDS = {
    library_pb2.IMAGE_KIND_UNSPECIFIED: ImageKind.ALL,
    library_pb2.IMAGE_KIND_ORIGINAL: ImageKind.ORIGINAL,
    library_pb2.IMAGE_KIND_EDIT: ImageKind.EDIT,
    library_pb2.IMAGE_KIND_UPLOAD: ImageKind.UPLOAD,
    library_pb2.IMAGE_KIND_GENERATED: ImageKind.GENERATED,
}

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class ImageLibraryServicer(library_pb2_grpc.ImageLibraryServiceServicer):
    """gRPC face of the image library."""

    def __init__(self, service: LibraryService, *, url_ttl: timedelta, usage_notice: str) -> None:
        self._service = service
        self._url_ttl = url_ttl
        self._usage_notice = usage_notice

    async def GetImage(
        self, request: library_pb2.GetImageRequest, context: Ctx
    ) -> library_pb2.GetImageResponse:
        image = await self._service.get(identity(), convert.image_id_from_name(request.name))
        return library_pb2.GetImageResponse(
            image=convert.image_to_proto(image, self._url_ttl, usage_notice=self._usage_notice)
        )

    async def ListImages(
        self, request: library_pb2.ListImagesRequest, context: Ctx
    ) -> library_pb2.ListImagesResponse:
        if request.kind not in _KINDS:
            raise InvalidRequest(f"kind {request.kind} is not a known kind", field="kind")
        query = ImageQuery(
            tags=tuple(request.tags),
            text=request.query,
            favorites_only=request.favorites_only,
            created_from=convert.optional_time(request, "create_time_start"),
            created_before=convert.optional_time(request, "create_time_end"),
            kind=_KINDS[request.kind],
            show_deleted=request.show_deleted,
        )
        page, token = await self._service.list_images(
            identity(), query, page_size=request.page_size, page_token=request.page_token
        )
        return library_pb2.ListImagesResponse(
            images=[
                convert.image_to_proto(i, self._url_ttl, usage_notice=self._usage_notice)
                for i in page
            ],
            next_page_token=token,
        )

    async def UpdateImage(
        self, request: library_pb2.UpdateImageRequest, context: Ctx
    ) -> library_pb2.UpdateImageResponse:
        new = request.image
        update = MetadataUpdate(
            fields=tuple(request.update_mask.paths),
            title=new.title,
            description=new.description,
            tags=tuple(new.tags),
            favorite=new.favorite,
        )
        image = await self._service.update(identity(), convert.image_id_from_name(new.name), update)
        return library_pb2.UpdateImageResponse(
            image=convert.image_to_proto(image, self._url_ttl, usage_notice=self._usage_notice)
        )

    async def DeleteImage(
        self, request: library_pb2.DeleteImageRequest, context: Ctx
    ) -> library_pb2.DeleteImageResponse:
        image = await self._service.set_deleted(
            identity(), convert.image_id_from_name(request.name), True
        )
        return library_pb2.DeleteImageResponse(
            image=convert.image_to_proto(image, self._url_ttl, usage_notice=self._usage_notice)
        )

    async def UndeleteImage(
        self, request: library_pb2.UndeleteImageRequest, context: Ctx
    ) -> library_pb2.UndeleteImageResponse:
        image = await self._service.set_deleted(
            identity(), convert.image_id_from_name(request.name), False
        )
        return library_pb2.UndeleteImageResponse(
            image=convert.image_to_proto(image, self._url_ttl, usage_notice=self._usage_notice)
        )

    async def PurgeImage(
        self, request: library_pb2.PurgeImageRequest, context: Ctx
    ) -> library_pb2.PurgeImageResponse:
        await self._service.purge(identity(), convert.image_id_from_name(request.name))
        return library_pb2.PurgeImageResponse()

    async def GetImageUrl(
        self, request: library_pb2.GetImageUrlRequest, context: Ctx
    ) -> library_pb2.GetImageUrlResponse:
        ttl = convert.optional_duration(request, "ttl")
        uri, lifetime, mime_type = await self._service.url(
            identity(), convert.image_id_from_name(request.name), ttl
        )
        expire = Timestamp()
        expire.GetCurrentTime()
        expire.FromSeconds(expire.seconds + int(lifetime.total_seconds()))
        return library_pb2.GetImageUrlResponse(uri=uri, expire_time=expire, mime_type=mime_type)

    async def DownloadImage(
        self, request: library_pb2.DownloadImageRequest, context: Ctx
    ) -> AsyncIterator[library_pb2.DownloadImageResponse]:
        download = await self._service.download(
            identity(),
            convert.image_id_from_name(request.name),
            convert.format_from_proto(request.format),
        )
        first = True
        async for chunk in download.chunks:
            message = library_pb2.DownloadImageResponse(data=chunk)
            if first:
                message.metadata.CopyFrom(
                    library_pb2.DownloadImageMetadata(
                        mime_type=download.mime_type,
                        size_bytes=download.size_bytes,
                        width=download.width,
                        height=download.height,
                        file_name=download.file_name,
                    )
                )
                first = False
            yield message

    async def GetImageLineage(
        self, request: library_pb2.GetImageLineageRequest, context: Ctx
    ) -> library_pb2.GetImageLineageResponse:
        lineage = await self._service.lineage(
            identity(), convert.image_id_from_name(request.name), request.max_depth
        )
        return library_pb2.GetImageLineageResponse(
            image=convert.image_to_proto(
                lineage.image, self._url_ttl, usage_notice=self._usage_notice
            ),
            ancestors=[
                library_pb2.LineageEntry(
                    image=convert.image_to_proto(i, self._url_ttl, usage_notice=self._usage_notice),
                    depth=d,
                )
                for i, d in lineage.ancestors
            ],
            descendants=[
                library_pb2.LineageEntry(
                    image=convert.image_to_proto(i, self._url_ttl, usage_notice=self._usage_notice),
                    depth=d,
                )
                for i, d in lineage.descendants
            ],
            truncated=lineage.truncated,
        )
