"""The tools, defined once: names, descriptions, input and output JSON Schemas.

Each tool's arguments and structured result are pydantic models; their JSON Schemas
(2020-12, pydantic's default dialect) are what the MCP server lists and what
`imagegen tools --format openai|mcp` prints, so the two cannot drift. The argument
models also validate calls: a bad argument is a tool error that names it.

Limits mirror the contract's (proto/imagegen/v1/*.proto) so a model learns them from
the schema, but the service still decides: it validates every request again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Style = Literal[
    "photographic",
    "artistic",
    "anime",
    "digital_art",
    "watercolor",
    "sketch",
    "pixel_art",
    "cinematic",
    "cartoon",
    "abstract",
    "minimalist",
    "vintage",
    "modern",
]
STYLES: tuple[str, ...] = get_args(Style)
ImageFormatName = Literal["png", "jpeg", "webp"]
GenerationStateName = Literal["queued", "running", "completed", "failed", "cancelled"]
OutpaintAnchorName = Literal[
    "center",
    "top",
    "bottom",
    "left",
    "right",
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
]

#: The contract's request_id alphabet and length (generation.proto, service comment).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"

RequestId = Annotated[
    str | None,
    Field(
        pattern=REQUEST_ID_PATTERN,
        description=(
            "Idempotency key (1-128 of A-Z a-z 0-9 . _ : -). A repeat with the same key and "
            "arguments returns the same job and is charged once. Omit it and the server "
            "derives one from this MCP session and JSON-RPC request, so a transport retry "
            "of the same request never runs twice while separate calls make separate jobs."
        ),
    ),
]
WaitSeconds = Annotated[
    float | None,
    Field(
        ge=0,
        description=(
            "Most seconds to wait for the job before answering with its handle (name, "
            "state, percent); cut to the server's ceiling (IMAGEGEN_MCP_MAX_WAIT, 55 s "
            "by default). Unset: the server's default (IMAGEGEN_MCP_WAIT, 30 s)."
        ),
    ),
]
Size = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description=(
            "WIDTHxHEIGHT in pixels: 256x256, 512x512, 1024x1024, 1024x1536 or 1536x1024 "
            "everywhere; a provider may offer more. The price follows the size."
        ),
    ),
]
SourceRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=30_000_000,
        description=(
            "An image: an https URL the server fetches, a data: URI with base64 PNG, JPEG "
            "or WebP, or one of your library images as images/{id}."
        ),
    ),
]


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _RenderOptions(_Arguments):
    negative_prompt: str = Field(
        default="", max_length=1000, description="What to keep out of the image; empty for none."
    )
    style: Style | None = Field(default=None, description="Style preset; unset for none.")
    count: int = Field(default=1, ge=1, le=4, description="How many images to make, 1 to 4.")
    format: ImageFormatName = Field(default="png", description="Output encoding.")
    seed: int | None = Field(
        default=None, ge=0, le=4_294_967_295, description="Seed for reproducible results."
    )
    provider: str = Field(
        default="",
        max_length=64,
        description="Provider id (local, forge, openai, sdwebui); empty for your default.",
    )
    model: str = Field(
        default="", max_length=200, description="Provider model; empty for its default."
    )


class GenerateImageArguments(_RenderOptions):
    """Arguments of generate_image."""

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw.")
    size: Size = "1024x1024"
    wait_seconds: WaitSeconds = None
    request_id: RequestId = None


class EditImageArguments(_RenderOptions):
    """Arguments of edit_image."""

    prompt: str = Field(
        min_length=1, max_length=4000, description="The edit instruction: what to change."
    )
    sources: list[SourceRef] = Field(
        min_length=1, max_length=4, description="The images to edit (never changed themselves)."
    )
    mask: SourceRef | None = Field(
        default=None, description="Optional mask: its transparent pixels mark what to change."
    )
    size: Size | None = Field(
        default=None, description="Output size; unset keeps the first source's aspect ratio."
    )
    wait_seconds: WaitSeconds = None
    request_id: RequestId = None


class BatchPromptArguments(_RenderOptions):
    """One job of batch_generate."""

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw.")
    size: Size = "1024x1024"


class BatchGenerateArguments(_Arguments):
    """Arguments of batch_generate."""

    prompts: list[BatchPromptArguments] = Field(
        min_length=1,
        max_length=1000,
        description=(
            "The jobs to make, one per item, in order: at most the server's batch size "
            "(IMAGEGEN_MAX_BATCH, 50 by default). All are accepted or none is."
        ),
    )
    request_id: RequestId = None


class GetGenerationArguments(_Arguments):
    """Arguments of get_generation."""

    name: str = Field(
        pattern=r"^generations/[^/]{1,100}$", description="The job, generations/{id}."
    )
    wait_seconds: float = Field(
        default=0,
        ge=0,
        description=(
            "Most seconds to wait for the job to end before answering (0: answer at once); "
            "cut to the server's ceiling (IMAGEGEN_MCP_MAX_WAIT, 55 s by default)."
        ),
    )


class CancelGenerationArguments(_Arguments):
    """Arguments of cancel_generation."""

    name: str = Field(
        pattern=r"^generations/[^/]{1,100}$", description="The job, generations/{id}."
    )
    request_id: RequestId = None


class ListImagesArguments(_Arguments):
    """Arguments of list_images."""

    page_size: int = Field(default=20, ge=1, le=100, description="Images per page.")
    page_token: str = Field(
        default="", max_length=2000, description="next_page_token of the previous page."
    )
    query: str = Field(
        default="",
        max_length=500,
        description="Words that must all match the prompt, title or description.",
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(
        default_factory=list, max_length=20, description="Only images with every one of these."
    )
    favorites_only: bool = Field(default=False, description="Only favourites.")
    kind: Literal["any", "original", "edit", "upload", "generated"] = Field(
        default="any", description="Only images made this way."
    )


class ListTemplatesArguments(_Arguments):
    """Arguments of list_templates."""

    page_size: int = Field(default=20, ge=1, le=100, description="Templates per page.")
    page_token: str = Field(
        default="", max_length=2000, description="next_page_token of the previous page."
    )
    category: str = Field(default="", max_length=50, description="Only this category.")


class GenerateFromTemplateArguments(_RenderOptions):
    """Arguments of generate_from_template."""

    template: str = Field(
        pattern=r"^templates/[^/]{1,100}$", description="The template, templates/{id}."
    )
    variables: dict[str, Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict, description="Values of the template's {{variables}}, by name."
    )
    size: Size | None = Field(default=None, description="Output size; unset for 1024x1024.")
    sources: list[SourceRef] = Field(
        default_factory=list,
        max_length=4,
        description="Images to edit with the rendered prompt as instruction; empty for none.",
    )
    wait_seconds: WaitSeconds = None
    request_id: RequestId = None


class QuoteGenerationArguments(_Arguments):
    """Arguments of quote_generation."""

    prompt: str = Field(min_length=1, max_length=4000, description="The prompt to price.")
    size: Size = "1024x1024"
    count: int = Field(default=1, ge=1, le=4, description="How many images.")
    sources: list[SourceRef] = Field(
        default_factory=list, max_length=4, description="Source images, for an edit's price."
    )
    provider: str = Field(default="", max_length=64, description="Provider id; empty: default.")
    model: str = Field(default="", max_length=200, description="Provider model.")


class GetCreditBalanceArguments(_Arguments):
    """get_credit_balance takes no arguments."""


class OutpaintImageArguments(_RenderOptions):
    """Arguments of outpaint_image."""

    source: SourceRef
    prompt: str = Field(
        min_length=1,
        max_length=4000,
        description="What the new area shows (the `local` provider extends the edges instead).",
    )
    left: int = Field(default=0, ge=0, le=2048, description="Pixels to add on the left.")
    top: int = Field(default=0, ge=0, le=2048, description="Pixels to add at the top.")
    right: int = Field(default=0, ge=0, le=2048, description="Pixels to add on the right.")
    bottom: int = Field(default=0, ge=0, le=2048, description="Pixels to add at the bottom.")
    size: Size | None = Field(
        default=None,
        description=(
            "The canvas size to reach instead of the sides (at least the source's size, "
            "at most 4096 a side); the source sits on it by anchor."
        ),
    )
    anchor: OutpaintAnchorName | None = Field(
        default=None, description="Where the source sits on size; unset for the centre."
    )
    wait_seconds: WaitSeconds = None
    request_id: RequestId = None


class UpscaleImageArguments(_Arguments):
    """Arguments of upscale_image."""

    image: str = Field(
        pattern=r"^images/[^/]{1,100}$",
        description="One of your library images, images/{id}, e.g. from a job's images.",
    )
    factor: Literal[2, 4] = Field(default=2, description="Enlarge by 2 or 4 on each side.")
    upscaler: str = Field(
        default="",
        max_length=128,
        description="One of the provider's upscalers (ListProviders); empty for its default.",
    )
    provider: str = Field(
        default="",
        max_length=64,
        description="Provider id that can upscale (local, sdwebui); empty for your default.",
    )
    format: ImageFormatName | None = Field(
        default=None, description="Output encoding; unset keeps the image's own."
    )
    wait_seconds: WaitSeconds = None
    request_id: RequestId = None


class SuggestPromptsArguments(_Arguments):
    """Arguments of suggest_prompts."""

    text: str = Field(
        default="",
        max_length=4000,
        description="What has been typed so far; empty for the style's phrases and favourites.",
    )
    style: Style | None = Field(default=None, description="Style preset to favour.")
    limit: int = Field(default=10, ge=1, le=50, description="Most suggestions to return.")


class EnhancePromptArguments(_Arguments):
    """Arguments of enhance_prompt."""

    prompt: str = Field(min_length=1, max_length=4000, description="The prompt to enrich.")
    style: Style | None = Field(
        default=None, description="Style whose lighting and composition to add; unset: none."
    )


class ImageOut(_Output):
    """One stored image."""

    name: str = Field(description="images/{id}: pass it to edit_image as a source.")
    uri: str = Field(description="Signed URL of the full image; empty for a deleted one.")
    uri_expire_time: str = Field(description="When uri stops working (RFC 3339).")
    width: int
    height: int
    mime_type: str
    size_bytes: int
    seed: int | None = Field(default=None, description="Seed it was made with, if known.")


class ErrorOut(_Output):
    """Why a job failed."""

    code: str = Field(description="Stable code, IMG_001 to IMG_012.")
    message: str
    retryable: bool = Field(description="Whether submitting the same request again may work.")


class GenerationOut(_Output):
    """A generation job as it stands."""

    name: str = Field(description="The job, generations/{id}: the handle to resume with.")
    state: GenerationStateName
    done: bool = Field(description="True once the job ended (completed, failed, cancelled).")
    percent: int = Field(ge=0, le=100, description="How far the job got.")
    images: list[ImageOut] = Field(description="Stored images, in batch order.")
    credits: int = Field(description="Credits reserved while it runs, final once it ended.")
    provider: str
    model: str
    request_id: str = Field(description="The idempotency key the job was submitted with.")
    create_time: str
    error: ErrorOut | None = Field(default=None, description="Set when the job failed.")
    next_step: str = Field(description="What to do next, e.g. how to resume waiting.")


class BatchOut(_Output):
    """A batch of jobs as accepted."""

    batch: str = Field(description="The batch, batches/{id}.")
    generations: list[GenerationOut] = Field(description="Its jobs, in the order of prompts.")
    next_step: str = Field(description="How to follow the jobs.")


class ListedImageOut(_Output):
    """One library image, as listed."""

    name: str
    uri: str
    width: int
    height: int
    mime_type: str
    prompt: str
    title: str
    tags: list[str]
    favorite: bool
    edit: bool
    upload: bool
    generation: str
    create_time: str


class ListImagesOut(_Output):
    """A page of library images, newest first."""

    images: list[ListedImageOut]
    next_page_token: str = Field(description="Pass it as page_token for more; empty at the end.")


class TemplateVariableOut(_Output):
    """A variable of a template."""

    name: str
    type: Literal["string", "integer", "number", "boolean"]
    required: bool
    default_value: str
    description: str


class TemplateOut(_Output):
    """A prompt template."""

    name: str = Field(description="templates/{id}: pass it to generate_from_template.")
    display_name: str
    description: str
    prompt: str = Field(description="The prompt with {{variable}} placeholders.")
    style: Style | None
    category: str
    variables: list[TemplateVariableOut]
    shared: bool
    usage_count: int


class ListTemplatesOut(_Output):
    """A page of templates you can use, newest first."""

    templates: list[TemplateOut]
    next_page_token: str


class QuoteOut(_Output):
    """What a request would cost."""

    credits: int = Field(description="Credits the request would reserve.")
    provider: str = Field(description="Provider that would serve it.")


class CreditBalanceOut(_Output):
    """Your credits."""

    available_credits: int = Field(description="What you can spend now.")
    reserved_credits: int = Field(description="Held by your queued and running jobs.")
    monthly_allowance_credits: int
    allowance_remaining_credits: int
    purchased_credits: int
    plan: str
    period_reset_time: str


class SuggestionOut(_Output):
    """One completion."""

    text: str = Field(description="The suggested prompt.")
    source: Literal["history", "template", "phrase"] = Field(
        description="Your own earlier prompt, a template you can see, or a built-in phrase."
    )
    template: str = Field(description="For a template suggestion, templates/{id}; else empty.")
    score: float = Field(description="Higher is better; comparable within one answer only.")


class SuggestPromptsOut(_Output):
    """Completions of the text, best first."""

    suggestions: list[SuggestionOut]


class EnhancedPromptOut(_Output):
    """A richer prompt."""

    prompt: str = Field(description="The richer prompt: pass it to generate_image.")
    negative_prompt: str = Field(description="A proposed negative prompt; may be empty.")
    enhancer: str = Field(description="`local` for the built-in enhancer, else the chat model.")
    credits: int = Field(description="Credits charged for it.")


@dataclass(frozen=True)
class ToolDefinition:
    """One tool: what the server lists and what `imagegen tools` prints."""

    name: str
    title: str
    description: str
    arguments: type[BaseModel]
    output: type[BaseModel]
    #: True for tools that submit a job (they wait, report progress and may become tasks).
    makes_job: bool = False
    read_only: bool = True

    @property
    def input_schema(self) -> dict[str, Any]:
        return _schema(self.arguments)

    @property
    def output_schema(self) -> dict[str, Any]:
        return _schema(self.output)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    return schema


_WAIT_NOTE = (
    " Waits up to wait_seconds: if the job ends in time the answer has the image URLs and "
    "small thumbnails; otherwise it has the job's name, state and percent, and you resume "
    "with get_generation(name, wait_seconds). Costs credits (see quote_generation)."
)

TOOLS: tuple[ToolDefinition, ...] = (
    ToolDefinition(
        name="generate_image",
        title="Generate an image",
        description="Make 1-4 images from a text prompt and store them in your library."
        + _WAIT_NOTE,
        arguments=GenerateImageArguments,
        output=GenerationOut,
        makes_job=True,
        read_only=False,
    ),
    ToolDefinition(
        name="edit_image",
        title="Edit an image",
        description=(
            "Make new images by editing source images with an instruction; the sources are "
            "never changed and become the result's parents."
        )
        + _WAIT_NOTE,
        arguments=EditImageArguments,
        output=GenerationOut,
        makes_job=True,
        read_only=False,
    ),
    ToolDefinition(
        name="outpaint_image",
        title="Outpaint an image",
        description=(
            "Extend an image outward: add pixels on each side, or give a larger canvas size "
            "and where the image sits on it; the new area is painted to match. The source "
            "is never changed and becomes the result's parent; priced as an edit."
        )
        + _WAIT_NOTE,
        arguments=OutpaintImageArguments,
        output=GenerationOut,
        makes_job=True,
        read_only=False,
    ),
    ToolDefinition(
        name="upscale_image",
        title="Upscale an image",
        description=(
            "Enlarge one of your library images 2x or 4x into a new library image whose "
            "parent is the original (the `local` provider resamples; others use their "
            "upscaler models)."
        )
        + _WAIT_NOTE,
        arguments=UpscaleImageArguments,
        output=GenerationOut,
        makes_job=True,
        read_only=False,
    ),
    ToolDefinition(
        name="batch_generate",
        title="Generate a batch of images",
        description=(
            "Queue one job per prompt in one call, all accepted or none (each counts toward "
            "your plan's request limits and costs what a single job of its size costs). The "
            "jobs run at most your plan's concurrency at a time; the answer comes at once "
            "with every job's name: follow each with get_generation(name, wait_seconds)."
        ),
        arguments=BatchGenerateArguments,
        output=BatchOut,
        read_only=False,
    ),
    ToolDefinition(
        name="get_generation",
        title="Get a generation",
        description=(
            "Look at a job by name, optionally waiting up to wait_seconds for it to end; "
            "once completed the answer has the image URLs and small thumbnails."
        ),
        arguments=GetGenerationArguments,
        output=GenerationOut,
    ),
    ToolDefinition(
        name="cancel_generation",
        title="Cancel a generation",
        description=(
            "Cancel a job: a queued one at once, a running one at its next checkpoint. "
            "Nothing is charged for images not delivered; a finished job is unchanged."
        ),
        arguments=CancelGenerationArguments,
        output=GenerationOut,
        read_only=False,
    ),
    ToolDefinition(
        name="list_images",
        title="List library images",
        description="List your stored images, newest first, with filters and pages.",
        arguments=ListImagesArguments,
        output=ListImagesOut,
    ),
    ToolDefinition(
        name="list_templates",
        title="List prompt templates",
        description="List the prompt templates you can use (yours and shared), newest first.",
        arguments=ListTemplatesArguments,
        output=ListTemplatesOut,
    ),
    ToolDefinition(
        name="generate_from_template",
        title="Generate from a template",
        description="Render a prompt template with variables and generate from it." + _WAIT_NOTE,
        arguments=GenerateFromTemplateArguments,
        output=GenerationOut,
        makes_job=True,
        read_only=False,
    ),
    ToolDefinition(
        name="quote_generation",
        title="Price a generation",
        description="The credits a generation would cost, without running it.",
        arguments=QuoteGenerationArguments,
        output=QuoteOut,
    ),
    ToolDefinition(
        name="suggest_prompts",
        title="Suggest prompts",
        description=(
            "Complete a prompt as it is typed, from your own earlier prompts (those whose "
            "images you kept first), the templates you can see and built-in style phrases."
        ),
        arguments=SuggestPromptsArguments,
        output=SuggestPromptsOut,
    ),
    ToolDefinition(
        name="enhance_prompt",
        title="Enhance a prompt",
        description=(
            "Rewrite a prompt into a richer one (subject, lighting, composition, quality) "
            "with a proposed negative prompt, for a style. Recorded in usage and charged as "
            "the price table says (0 credits by default)."
        ),
        arguments=EnhancePromptArguments,
        output=EnhancedPromptOut,
        read_only=False,
    ),
    ToolDefinition(
        name="get_credit_balance",
        title="Get credit balance",
        description="Your credit balance, plan and monthly allowance.",
        arguments=GetCreditBalanceArguments,
        output=CreditBalanceOut,
    ),
)

TOOLS_BY_NAME: dict[str, ToolDefinition] = {tool.name: tool for tool in TOOLS}


def mcp_tool_definitions() -> list[dict[str, Any]]:
    """The tools as MCP `Tool` JSON objects (what tools/list answers)."""
    return [
        {
            "name": tool.name,
            "title": tool.title,
            "description": tool.description,
            "inputSchema": tool.input_schema,
            "outputSchema": tool.output_schema,
            "annotations": {
                "title": tool.title,
                "readOnlyHint": tool.read_only,
                "destructiveHint": False,
                "idempotentHint": tool.read_only,
                "openWorldHint": False,
            },
        }
        for tool in TOOLS
    ]


def openai_tool_definitions() -> list[dict[str, Any]]:
    """The tools in OpenAI function-calling form (Chat Completions `tools`)."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.input_schema,
            },
        }
        for tool in TOOLS
    ]
