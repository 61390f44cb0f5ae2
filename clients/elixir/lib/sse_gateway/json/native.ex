defmodule SseGateway.JSON.Native do
  @moduledoc """
  A small, strict JSON codec (RFC 8259) for hosts without `JSON` or `Jason`.

  Encoding: maps (atom or string keys), lists, binaries (raw UTF-8; `"`, `\\`
  and control characters escaped), integers, floats (shortest text that reads
  back the same), `true`/`false`/`nil` and other atoms (as strings). Compact:
  no whitespace, so an event's data is always one SSE `data:` line.

  Decoding: objects become maps with string keys (a repeated key: the last
  wins), numbers with a fraction or exponent become floats, others integers;
  `\\uXXXX` escapes and surrogate pairs are decoded, a lone surrogate or
  invalid UTF-8 is an error (the gateway refuses them too). Nesting is bounded.
  """

  @max_depth 512

  # ---------------------------------------------------------------- encode

  @doc "Encodes `term`; raises `ArgumentError` on a term JSON cannot hold."
  @spec encode!(term()) :: binary()
  def encode!(term), do: term |> enc() |> IO.iodata_to_binary()

  defp enc(nil), do: "null"
  defp enc(true), do: "true"
  defp enc(false), do: "false"
  defp enc(a) when is_atom(a), do: string(Atom.to_string(a))
  defp enc(s) when is_binary(s), do: string(s)
  defp enc(i) when is_integer(i), do: Integer.to_string(i)
  defp enc(f) when is_float(f), do: float(f)

  defp enc(list) when is_list(list),
    do: [?[, list |> Enum.map(&enc/1) |> Enum.intersperse(?,), ?]]

  # Calendar types as ISO 8601, as Jason and Elixir's JSON write them.
  defp enc(%mod{} = t) when mod in [DateTime, NaiveDateTime, Date, Time],
    do: string(mod.to_iso8601(t))

  defp enc(%{__struct__: mod} = struct) do
    raise ArgumentError, "cannot encode struct #{inspect(mod)} as JSON: #{inspect(struct)}"
  end

  defp enc(map) when is_map(map) do
    pairs = Enum.map(map, fn {k, v} -> [key(k), ?:, enc(v)] end)
    [?{, Enum.intersperse(pairs, ?,), ?}]
  end

  defp enc(other), do: raise(ArgumentError, "cannot encode #{inspect(other)} as JSON")

  defp key(k) when is_binary(k), do: string(k)
  defp key(k) when is_atom(k) and k not in [nil, true, false], do: string(Atom.to_string(k))
  defp key(k) when is_integer(k), do: string(Integer.to_string(k))
  defp key(k), do: raise(ArgumentError, "cannot encode map key #{inspect(k)} as JSON")

  # OTP 25+ has `:short` (shortest round-trip digits); Float.to_string/1 is
  # the same algorithm on older releases.
  defp float(f) do
    try do
      :erlang.float_to_binary(f, [:short])
    rescue
      ArgumentError -> Float.to_string(f)
    end
  end

  defp string(s) do
    unless String.valid?(s) do
      raise ArgumentError, "cannot encode invalid UTF-8 as a JSON string: #{inspect(s)}"
    end

    [?", escape(s, s, 0, 0, []), ?"]
  end

  # Copies runs of bytes that need no escape as sub-binaries.
  defp escape(<<>>, orig, start, len, acc), do: [acc | binary_part(orig, start, len)]

  defp escape(<<c, rest::binary>>, orig, start, len, acc) when c < 0x20 or c == ?" or c == ?\\ do
    acc = [acc, binary_part(orig, start, len), esc(c)]
    escape(rest, orig, start + len + 1, 0, acc)
  end

  defp escape(<<_, rest::binary>>, orig, start, len, acc),
    do: escape(rest, orig, start, len + 1, acc)

  defp esc(?"), do: "\\\""
  defp esc(?\\), do: "\\\\"
  defp esc(?\n), do: "\\n"
  defp esc(?\r), do: "\\r"
  defp esc(?\t), do: "\\t"
  defp esc(?\b), do: "\\b"
  defp esc(?\f), do: "\\f"

  defp esc(c) do
    hex = c |> Integer.to_string(16) |> String.downcase() |> String.pad_leading(4, "0")
    "\\u" <> hex
  end

  # ---------------------------------------------------------------- decode

  @doc "Decodes one JSON text: `{:ok, term}` or `{:error, reason}`."
  @spec decode(binary()) :: {:ok, term()} | {:error, term()}
  def decode(bin) when is_binary(bin) do
    {value, rest} = value(ws(bin), 0)

    case ws(rest) do
      "" -> {:ok, value}
      more -> {:error, {:trailing, byte_size(bin) - byte_size(more)}}
    end
  catch
    {:json, reason} -> {:error, reason}
  end

  @doc "Like `decode/1`, raising `ArgumentError`."
  def decode!(bin) do
    case decode(bin) do
      {:ok, v} -> v
      {:error, reason} -> raise ArgumentError, "invalid JSON: #{inspect(reason)}"
    end
  end

  defp fail(reason), do: throw({:json, reason})

  defp ws(<<c, rest::binary>>) when c in [?\s, ?\t, ?\n, ?\r], do: ws(rest)
  defp ws(rest), do: rest

  defp value(_, depth) when depth > @max_depth, do: fail(:too_deep)
  defp value(<<?{, rest::binary>>, depth), do: object(ws(rest), depth + 1, [])
  defp value(<<?[, rest::binary>>, depth), do: array(ws(rest), depth + 1, [])
  defp value(<<?", rest::binary>>, _), do: str(rest, [])
  defp value(<<"true", rest::binary>>, _), do: {true, rest}
  defp value(<<"false", rest::binary>>, _), do: {false, rest}
  defp value(<<"null", rest::binary>>, _), do: {nil, rest}
  defp value(<<c, _::binary>> = bin, _) when c == ?- or c in ?0..?9, do: number(bin)
  defp value(<<>>, _), do: fail(:unexpected_end)
  defp value(<<c, _::binary>>, _), do: fail({:unexpected_byte, c})

  defp object(<<?}, rest::binary>>, _, []), do: {%{}, rest}

  defp object(<<?", rest::binary>>, depth, acc) do
    {k, rest} = str(rest, [])

    case ws(rest) do
      <<?:, rest::binary>> ->
        {v, rest} = value(ws(rest), depth)

        case ws(rest) do
          <<?,, rest::binary>> -> object(ws(rest), depth, [{k, v} | acc])
          <<?}, rest::binary>> -> {Map.new(Enum.reverse([{k, v} | acc])), rest}
          _ -> fail(:expected_comma_or_brace)
        end

      _ ->
        fail(:expected_colon)
    end
  end

  defp object(_, _, _), do: fail(:expected_key)

  defp array(<<?], rest::binary>>, _, []), do: {[], rest}

  defp array(bin, depth, acc) do
    {v, rest} = value(bin, depth)

    case ws(rest) do
      <<?,, rest::binary>> -> array(ws(rest), depth, [v | acc])
      <<?], rest::binary>> -> {Enum.reverse([v | acc]), rest}
      _ -> fail(:expected_comma_or_bracket)
    end
  end

  defp str(<<?", rest::binary>>, acc) do
    s = IO.iodata_to_binary(Enum.reverse(acc))
    if String.valid?(s), do: {s, rest}, else: fail(:invalid_utf8)
  end

  defp str(<<?\\, rest::binary>>, acc) do
    case rest do
      <<?", r::binary>> -> str(r, [?" | acc])
      <<?\\, r::binary>> -> str(r, [?\\ | acc])
      <<?/, r::binary>> -> str(r, [?/ | acc])
      <<?b, r::binary>> -> str(r, [?\b | acc])
      <<?f, r::binary>> -> str(r, [?\f | acc])
      <<?n, r::binary>> -> str(r, [?\n | acc])
      <<?r, r::binary>> -> str(r, [?\r | acc])
      <<?t, r::binary>> -> str(r, [?\t | acc])
      <<?u, h::binary-size(4), r::binary>> -> unicode(hex(h), r, acc)
      _ -> fail(:invalid_escape)
    end
  end

  defp str(<<c, _::binary>>, _) when c < 0x20, do: fail(:control_character_in_string)

  defp str(bin, acc) do
    # Take the run up to the next quote, backslash or control byte at once.
    n = run(bin, 0)

    if n == 0 do
      fail(:unexpected_end)
    else
      <<chunk::binary-size(n), rest::binary>> = bin
      str(rest, [chunk | acc])
    end
  end

  defp run(<<c, rest::binary>>, n) when c >= 0x20 and c != ?" and c != ?\\, do: run(rest, n + 1)
  defp run(_, n), do: n

  defp unicode(hi, <<"\\u", h::binary-size(4), r::binary>>, acc) when hi in 0xD800..0xDBFF do
    lo = hex(h)

    if lo in 0xDC00..0xDFFF do
      cp = 0x10000 + Bitwise.bsl(hi - 0xD800, 10) + (lo - 0xDC00)
      str(r, [<<cp::utf8>> | acc])
    else
      fail(:lone_surrogate)
    end
  end

  defp unicode(cp, _r, _acc) when cp in 0xD800..0xDFFF, do: fail(:lone_surrogate)
  defp unicode(cp, r, acc), do: str(r, [<<cp::utf8>> | acc])

  defp hex(h) do
    if h =~ ~r/\A[0-9A-Fa-f]{4}\z/,
      do: String.to_integer(h, 16),
      else: fail(:invalid_unicode_escape)
  end

  defp number(bin) do
    {int, rest} = int_part(bin)
    {frac, rest} = frac_part(rest)
    {exp, rest} = exp_part(rest)
    text = int <> frac <> exp

    if frac == "" and exp == "" do
      {String.to_integer(text), rest}
    else
      {to_float(int, frac, exp), rest}
    end
  end

  defp int_part(<<?-, rest::binary>>) do
    {digits, rest} = int_digits(rest)
    {"-" <> digits, rest}
  end

  defp int_part(bin), do: int_digits(bin)

  defp int_digits(<<?0, rest::binary>>), do: {"0", rest}

  defp int_digits(<<c, _::binary>> = bin) when c in ?1..?9, do: digits(bin)
  defp int_digits(_), do: fail(:invalid_number)

  defp frac_part(<<?., c, _::binary>> = bin) when c in ?0..?9 do
    <<?., rest::binary>> = bin
    {d, rest} = digits(rest)
    {"." <> d, rest}
  end

  defp frac_part(<<?., _::binary>>), do: fail(:invalid_number)
  defp frac_part(bin), do: {"", bin}

  defp exp_part(<<e, rest::binary>>) when e in [?e, ?E] do
    {sign, rest} =
      case rest do
        <<s, r::binary>> when s in [?+, ?-] -> {<<s>>, r}
        r -> {"", r}
      end

    case rest do
      <<c, _::binary>> when c in ?0..?9 ->
        {d, rest} = digits(rest)
        {"e" <> sign <> d, rest}

      _ ->
        fail(:invalid_number)
    end
  end

  defp exp_part(bin), do: {"", bin}

  defp digits(bin), do: digits(bin, 0, bin)
  defp digits(<<c, rest::binary>>, n, orig) when c in ?0..?9, do: digits(rest, n + 1, orig)
  defp digits(rest, n, orig), do: {binary_part(orig, 0, n), rest}

  # Erlang's float parser wants digits on both sides of the point.
  defp to_float(int, frac, exp) do
    frac = if frac == "", do: ".0", else: frac
    text = int <> frac <> exp

    try do
      String.to_float(text)
    rescue
      ArgumentError -> fail({:number_out_of_range, text})
    end
  end
end
