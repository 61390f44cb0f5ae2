defmodule SseGateway.SSE do
  @moduledoc """
  The Server-Sent Events parser (WHATWG HTML, "Interpreting an event stream"),
  fed with body bytes as they arrive, in any split.

  Lines end in CRLF, LF or CR; a CR at the end of a chunk is held until the
  next byte shows whether an LF follows. `id` (without NUL) sets the last
  event id, also in a block without data (the gateway's first block of a
  live-only stream is `id: <head>` alone); `retry` takes digits only;
  comments (`:`) and unknown fields are ignored; a leading BOM is skipped.
  """

  defstruct buf: "", data: [], event: "", id: nil, id_set?: false, started?: false

  @type t :: %__MODULE__{}
  @type item ::
          {:event, %{id: String.t() | nil, event: String.t(), data: String.t()}}
          | {:id, String.t()}
          | {:retry, non_neg_integer()}

  @doc "A parser before the first byte."
  def new, do: %__MODULE__{}

  @doc "Feeds bytes; returns what completed, in order, and the new state."
  @spec feed(t(), binary()) :: {[item()], t()}
  def feed(%__MODULE__{started?: false} = p, bin) do
    buf = p.buf <> bin

    cond do
      byte_size(buf) < 3 and :binary.longest_common_prefix([buf, "\uFEFF"]) == byte_size(buf) ->
        {[], %{p | buf: buf}}

      String.starts_with?(buf, "\uFEFF") ->
        feed(%{p | started?: true, buf: ""}, binary_part(buf, 3, byte_size(buf) - 3))

      true ->
        feed(%{p | started?: true, buf: ""}, buf)
    end
  end

  def feed(%__MODULE__{} = p, bin), do: lines(p.buf <> bin, %{p | buf: ""}, [])

  defp lines(buf, p, acc) do
    case :binary.match(buf, ["\r\n", "\n", "\r"]) do
      :nomatch ->
        {Enum.reverse(acc), %{p | buf: buf}}

      {pos, 1} when pos == byte_size(buf) - 1 and binary_part(buf, pos, 1) == "\r" ->
        # A CR as the last byte: wait, an LF may follow in the next chunk.
        {Enum.reverse(acc), %{p | buf: buf}}

      {pos, len} ->
        line = binary_part(buf, 0, pos)
        rest = binary_part(buf, pos + len, byte_size(buf) - pos - len)
        {items, p} = line(line, p)
        lines(rest, p, Enum.reverse(items, acc))
    end
  end

  defp line("", p) do
    items = if p.id_set?, do: [{:id, p.id}], else: []

    case p.data do
      [] ->
        {items, %{p | event: "", id_set?: false}}

      data ->
        data = data |> Enum.reverse() |> Enum.join("\n")
        event = if p.event == "", do: "message", else: p.event

        {[{:event, %{id: p.id, event: event, data: data}}],
         %{p | data: [], event: "", id_set?: false}}
    end
  end

  defp line(":" <> _comment, p), do: {[], p}

  defp line(line, p) do
    {field, value} =
      case :binary.split(line, ":") do
        [field, " " <> value] -> {field, value}
        [field, value] -> {field, value}
        [field] -> {field, ""}
      end

    field(field, value, p)
  end

  defp field("data", v, p), do: {[], %{p | data: [v | p.data]}}
  defp field("event", v, p), do: {[], %{p | event: v}}

  defp field("id", v, p) do
    if String.contains?(v, <<0>>), do: {[], p}, else: {[], %{p | id: v, id_set?: true}}
  end

  defp field("retry", v, p) do
    if v != "" and v =~ ~r/\A[0-9]+\z/,
      do: {[{:retry, String.to_integer(v)}], p},
      else: {[], p}
  end

  defp field(_, _, p), do: {[], p}
end
